"""Descriptor-layout fuzzing of the device end: coverage-guided (atheris) and differential.

* :mod:`sim.fuzz.target`: :func:`~sim.fuzz.target.fuzz_one`, the checked run of one input;
* :mod:`sim.fuzz.encoding`: the input format (raw layouts, builder decisions, driver programs);
* :mod:`sim.fuzz.oracle`: the reference model the device end is compared with;
* :mod:`sim.fuzz.memory`: the checking memory proxy and the step counter;
* :mod:`sim.fuzz.seeds`, :mod:`sim.fuzz.findings`, :mod:`sim.fuzz.runner`: corpus, findings
  and the libFuzzer process;
* :mod:`sim.fuzz.differential`: the same layouts against QEMU's virtio-balloon over qtest.

Nothing is imported here: the libFuzzer runner must import the device end itself, inside
atheris's instrumentation, for coverage to be collected.
"""
