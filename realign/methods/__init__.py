"""The realignment methods as pure tensor functions: no file access here."""
