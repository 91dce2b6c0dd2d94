"""`python -m student_worker.demo` is `kdserve-demo`."""

from student_worker.demo.cli import main

raise SystemExit(main())
