"""vLLM's tokenizer endpoints, at the root as there: /tokenize, /detokenize and /tokenizer_info, what
evaluation harnesses use to count and split prompts without a copy of the tokenizer (lm-eval's remote
tokenizer backend).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from llama4.inference.engine import Engine, check_token_ids
from llama4.prompt import Tokenizer
from llama4.serve.engine_process import EngineProcess
from llama4.serve.errors import APIError
from llama4.serve.request_reader import RequestReader
from llama4.serve.schemas import DetokenizeRequest, TokenizeRequest


def add_tokenizer_routes(app: FastAPI, engine: Engine | EngineProcess, tokenizer: Tokenizer,
                         reader: RequestReader) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = await reader.read(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_request")
        if req.prompt is not None:  # special-token strings count as the special tokens, as in vLLM
            ids = tokenizer.encode(req.prompt, bos=req.add_special_tokens is not False, allow_special=True)
        else:
            ids = _chat_token_ids(tokenizer, req)
        body = {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.decode([t]) for t in ids]
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = await reader.read(request, DetokenizeRequest)
        try:
            check_token_ids(req.tokens, tokenizer.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param="tokens", code="invalid_request") from None
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        reader.authorize(request)
        return {"tokenizer_class": "llama4.prompt.tokenizer.Tokenizer",
                "bos_token": tokenizer.decode([tokenizer.bos_id]), "eos_token": tokenizer.decode([tokenizer.eot_id]),
                "pad_token": tokenizer.decode([tokenizer.pad_id]), "vocab_size": tokenizer.vocab_size,
                "model_max_length": engine.max_context}


def _chat_token_ids(tokenizer: Tokenizer, req: TokenizeRequest) -> list[int]:
    """The tokens of ``req.messages`` (text parts only) rendered by the chat template."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    if any(isinstance(m.get("content"), list) and any(p.get("type") != "text" for p in m["content"])
           for m in messages):
        raise APIError(400, "/tokenize takes text messages only (images need the chat endpoint)",
                       param="messages", code="invalid_request")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                             continue_final_message=req.continue_final_message)
    except (ValueError, KeyError, TypeError) as e:
        raise APIError(400, f"cannot render the messages: {e}", param="messages", code="invalid_request") from None
