//! meshid's policy language (placeholder; being written).
