"""One revision per released change of the schema, oldest first (0001: the first release)."""
