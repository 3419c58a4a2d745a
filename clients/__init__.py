"""The `minehead` command (clients.cli) and the local launcher (clients.run_all).

The importable client library is `minehead.client`."""
