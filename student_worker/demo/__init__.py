"""The one-command demo: a digits teacher served on loopback, one student per loss at once."""
