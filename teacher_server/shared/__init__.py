"""What the teacher server and its clients share: the wire contract and its two encodings
(`contract`, `wire`), the error table (`errors`), the pixel arithmetic of views (`views`),
the architectures by name (`archs`), weights files (`weights`), what a teacher endpoint
string names (`endpoints`: the client connects to it, the server's remote members use it)
and config helpers."""
