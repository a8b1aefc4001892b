"""The cloud's own interfaces to a repository: the action table (actions.py), the API keys (keys.py), request
signatures (signing.py) and the ECS OpenAPI server (server.py). docs/API.md, "Three interfaces"."""
