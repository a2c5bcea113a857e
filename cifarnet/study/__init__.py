"""The CIFAR-10 ConvNet study, one application of the cifarnet library: the study's network and
its six variants (:mod:`.models`, :mod:`.variants`), data (:mod:`.data`), training
(:mod:`.train`), the results table and plots (:mod:`.results`, :mod:`.plots`), data-parallel
runs (:mod:`.distributed`) and the commands ``cifarnet-train`` and ``cifarnet-eval``
(:mod:`.cli`). It imports the library (:mod:`cifarnet.ops`, :mod:`cifarnet.nn`,
:func:`cifarnet.fuse`); the library never imports it.
"""
