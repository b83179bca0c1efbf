"""Where programs run: ``Runtime`` (in process), ``RuntimeEndpoint`` (a server's /generate), ``OpenAI`` (/v1)."""
