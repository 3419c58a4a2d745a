"""minehead: shared runtime (minehead.core) and the generated gRPC stubs (minehead.<svc>.v1)."""

__version__ = "0.1.0"
