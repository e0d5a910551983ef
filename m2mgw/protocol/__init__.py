"""MGP/1, the module protocol: codec, key schedule and session logic, free of I/O."""
