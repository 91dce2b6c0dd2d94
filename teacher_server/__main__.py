"""`python -m teacher_server` is `kdserve-teacher`."""

from teacher_server.server.cli import main

raise SystemExit(main())
