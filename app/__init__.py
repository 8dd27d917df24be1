"""tapprove: real-time login approval (push MFA) and contact verification."""

__version__ = "0.1.0"
