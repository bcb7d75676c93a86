"""Quantization recipes: parsing, their canonical names, and the errors they give."""

from __future__ import annotations

import pytest
import torch

from llama4.quant import QuantRecipe, WeightFormat

INT8, INT4 = WeightFormat.parse("int8"), WeightFormat.parse("int4-g32")


@pytest.mark.parametrize("text, expected", [
    ("int8", QuantRecipe(experts=INT8, shared=INT8, attention=INT8)),
    ("int4", QuantRecipe(experts=INT4, shared=INT4, attention=INT4)),
    ("int4-g128-asym", QuantRecipe(*[WeightFormat(4, 128, symmetric=False)] * 3)),
    ("experts=int4-g32,attention=int8,shared=int8,head=int8",
     QuantRecipe(experts=INT4, shared=INT8, attention=INT8, head=INT8)),
    ("experts=int4-g32, attention=int8", QuantRecipe(experts=INT4, attention=INT8)),
    ("int4,attention=int8,shared=none", QuantRecipe(experts=INT4, attention=INT8)),
    ("int8,scales=bf16", QuantRecipe(INT8, INT8, INT8, scale_dtype=torch.bfloat16)),
])
def test_parse(text, expected):
    recipe = QuantRecipe.parse(text)
    assert recipe == expected
    assert QuantRecipe.parse(str(recipe)) == recipe


def test_canonical_name():
    assert str(QuantRecipe.parse("head=int8,experts=int4")) == "experts=int4-g32,head=int8"
    assert str(QuantRecipe()) == "none"


@pytest.mark.parametrize("text, message", [
    ("", "empty recipe"),
    ("int8,,head=int8", "empty recipe or item"),
    ("int9", "unknown weight format"),
    ("experts=int4-g48", "group size in"),
    ("router=int8", "unknown kind 'router'"),
    ("experts=int4,experts=int8", "given twice"),
    ("int8,int4", "more than one format"),
    ("embeddings=int8", "embeddings quantization is not supported yet"),
    ("int8,scales=fp16", "scales must be one of"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        QuantRecipe.parse(text)


def test_constructor_checks():
    with pytest.raises(ValueError, match="embeddings quantization is not supported yet"):
        QuantRecipe(embeddings=INT8)
    with pytest.raises(ValueError, match="a WeightFormat or None"):
        QuantRecipe(experts="int8")
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantRecipe(experts=INT8, scale_dtype=torch.float16)
