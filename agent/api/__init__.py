"""The HIS API: JSON-RPC core (jsonrpc), methods, and its transports."""
