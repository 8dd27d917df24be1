"""SQL persistence: SQLModel tables, the engine, and the queries the service runs."""
