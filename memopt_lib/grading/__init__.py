"""``memopt-grade``: grade a class's notebooks without trusting a line of them.

Every submission is untrusted code. A student can monkeypatch ``torch.cuda.max_memory_allocated``
or the profiler, tag a cell ``raises-exception``, add an IPython input transformer, call
``sys.exit(0)``, forge a results file, sleep forever, allocate 100 GB, fork-bomb, read the
solutions or hand in malformed JSON. The design answers each with a rule.

**Nothing computed, printed, saved or asserted in the student's kernel decides a grade.**

1. *Rebuild* (:mod:`.rebuild`): the code that runs is the instructor's graded cells with
   only the student's solution regions spliced in, matched by cell id. Tags, outputs,
   metadata and every other cell are ignored; the notebook is parsed as bounded JSON, never
   through IPython, and never unpickled or ``torch.load``-ed.
2. *Sandbox* (:mod:`.sandbox` in the grader, :mod:`.confine` in the child): one fresh
   process per submission, in its own session, PID, network and mount namespaces (when
   run as root), as an unprivileged uid of its own, with rlimits on CPU, heap, processes
   and file size, a wall-clock timeout that kills everything it started, a private
   ``/tmp`` as its working folder, and the solutions, reference verifiers, other students'
   submissions and the output folder covered by empty mounts. No network.
3. *Runner* (:mod:`.runner`, in the child): imports torch, the profiler and the check
   module *first*, photographs the instruments and installs an audit hook
   (:mod:`.guard`), *then* executes the rebuilt cells with ``exec`` and runs each check on
   inputs drawn from a seed the grader picked for this run. Checks measure memory
   themselves, twice for memory checks: the profiler's tracker and the kernel's resident
   high-water mark (:mod:`.rss`), which no Python code in the process can rewrite.
   Any change to the instruments -> every check ``failed``, status ``tampering``.
4. *Verdict* (:mod:`.grade`, in the grader): results arrive as JSON lines on a pipe, each
   carrying a per-run random token; only results for checks the grader asked for, in
   order, once each, are accepted; scores are recomputed (points if passed, else 0);
   answers are re-verified in the grader's process where the lab has a reference
   verifier; a silent death becomes ``timeout``, ``oom`` or ``crashed`` from what the grader
   itself saw (signal, timer). Files are written by the grader after the child is gone.

Statuses per check: ``passed failed error timeout oom crashed not_run``; per submission:
``graded``, ``tampering`` or ``ungradable`` (with the reason).

**What this cannot promise.** The student's functions and the checks must share one process
(checks call them and measure them), so code that runs there can in principle defeat any
in-process defence: read the token from memory and forge messages, mutate the tracker's
counters through an object it reached without a flagged call, patch a method and put it
back within one call (the guard's photographs miss it; the resident-memory measurement and
the grader-side verification are what catch it), or write memory through native code.
The guard and the audit hook make such attacks deliberate, visible work instead of a
one-liner, the rebuilt-code rule makes them *code in the student's own solution* that a
human can read (``review_flags`` in grades.csv lists suspicious names), and the sandbox
bounds the damage to one submission's grade. Without root the namespaces, uid drop and
``RLIMIT_NPROC`` are unavailable: the CLI says so on every run.
"""
