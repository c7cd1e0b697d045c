"""``memopt-grade``: grade a class's notebooks; every verdict decided outside the student's process.

Every submission is untrusted code that runs in a process it fully controls: it can read and
write that process's memory (``/proc/self/mem``, frames, ``gc``), patch anything, forge any
message on any pipe it can reach, and exit whenever it likes. So that process only ever hands
back *data*; the grader decides.

**How a batch is graded** (:mod:`.grade`)

1. *Rebuild* (:mod:`.rebuild`): the code that runs is the instructor's graded cells with only the
   student's solution regions spliced in, matched by cell id; tags, outputs, metadata and every
   other cell are ignored; the notebook is parsed as bounded JSON, never unpickled.
2. *Seeds*: one per check, drawn by the grader per batch, sent to a child only in the command
   that starts that check.
3. *Reference run*: a sandboxed child that runs only the lab's reference namespace (the
   library's implementations, ``Registry.reference``) collects the reference evidence.
4. *Canary*: the instructor's solution and the unsolved lab are graded like students; unless
   they score full marks (of what can run here) and 0, the batch stops (exit 2) before any student.
5. *Students*: one sandboxed child each (:mod:`.sandbox`, :mod:`.child`, :mod:`.confine`,
   :mod:`.runner`; the protocol and the judging: :mod:`.verdict`). For
   each check the grader sends "run X with seed S"; the child runs the check's *collect* and
   sends plain data. The grader runs the check's *judge* itself, comparing with the reference's
   evidence on the same inputs. For memory checks the grader measures the child from outside
   while the collect runs (:mod:`.meter`: a memory cgroup per child, an RssAnon sampler, on
   CUDA the driver's per-process usage) against the reference run's level at the same point.

**What is guaranteed** (each line is what a test in ``tests/test_grading_*.py`` shows)

* A score is the sum of points of checks whose judge, run in the grader, passed on evidence
  collected after the check's seed was sent; a child can report a check failed but never
  passed, and a message out of order (forged results, evidence for a check not asked yet)
  makes the submission ``tampering`` with 0 points (``test_grading_units``, red teams).
* Memory verdicts use the grader's own measurement from outside the child; the in-process
  tracker is shown as explanation only. Resetting, muting, patching-and-restoring the tracker,
  disabling dispatch modes, moving work to a thread or into numpy, overwriting check constants
  (also through ``/proc/self/mem``) earn nothing on labs 01 and 04 (``test_grading_lab01``,
  ``test_grading_lab04``). A cgroup's peak sees spikes of any length; the page cache a child is
  first to read is subtracted (``test_grading_meter``).
* The baseline of a memory comparison is the reference run's level, so a student's process that
  starts high (memory freed but held by the allocator) cannot hide a rise (``test_grading_units``).
* Inputs vary per batch (configs, shapes, learning rates, seeds); a training step passes only if
  it returns the batch's loss and moves the parameters as one optimizer step on it would.
* GPU-only checks on a CPU grader, and legacy checks (verdict decided in-process), are
  ``not_run`` by the grader's decision and not counted in ``max_score_here`` (``grades.csv``).
* As root with ``unshare``: the child's ``/`` is an allow-list (Python prefixes, site-packages,
  the kit's ``memopt_lib`` folder -- not the checkout around an editable install --, the model
  cache, system libraries, a private ``/tmp``), in its own PID, network and mount namespaces,
  as an unprivileged uid, with rlimits and a wall-clock kill. Grading works from an editable or
  a plain install in a mode-700 folder under ``/tmp``, and a submission there sees no ``.git``,
  ``tests/``, ``solutions/`` or other folder (``test_grading_install``; solutions copied under
  ``/tmp``, ``/var/tmp`` or elsewhere: ``test_grading_lab01``).
* Exit status: 0 when the batch ran, 2 when the reference run or the canary failed, 3 when
  every submission was ungradable.

**What is not guaranteed**

* Answers that the kit itself can compute: the reference implementations live in ``memopt_lib``
  (the package students install), so a region that calls them gets the reference's answer.
  ``review_flags`` in grades.csv lists ``memopt_lib`` imports and introspection for a human.
* Memory below the measurement's resolution: two processes doing the same work differ by the
  source's slack (``MEMORY_SLACK_BYTES``), so waste smaller than that plus the check's ratio
  passes. On a grader without a cgroup (not root) the sampler decides and can miss spikes
  shorter than its 2 ms interval.
* The CUDA driver source (NVML / nvidia-smi) is written to the same contract but was not run on
  a GPU by these tests.
* Without root there are no namespaces, no allow-list, no uid drop and no cgroup: the CLI warns.
* The audit-hook guard (:mod:`.guard`) in the child is defence in depth only: it can turn a
  visible patch into ``tampering``, but nothing depends on it.
"""
