"""The model math: imports nothing from inference, serving, training, quantization or distribution."""
