"""What the teacher server and its clients share: the wire contract and its two encodings
(`contract`, `wire`), the error table (`errors`), the pixel arithmetic of views (`views`),
the architectures by name (`archs`), weights files (`weights`) and config helpers."""
