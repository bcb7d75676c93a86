"""Generation: sampling, the reference generate loop, streaming."""
