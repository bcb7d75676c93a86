"""Real OpenAI-API clients (lm-eval, LangChain, LiteLLM) against a live server: the held-out tasks
they run (heldout.py); the tests are tests/serve/test_real_clients.py."""
