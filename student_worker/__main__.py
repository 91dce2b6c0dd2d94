"""`python -m student_worker` is `kdserve-student`."""

from student_worker.cli import main

raise SystemExit(main())
