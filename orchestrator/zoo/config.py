"""The source zoo's config: which source models a target task may distil from, and what each was trained on.

The label-leak rule (paper 2, Borup et al. 2023: sources come from *other* domains): no source may be trained
on the target task's labels. :func:`check_label_leak` enforces it by ``trained_on``, the name of the labeled
data a source was trained on (``imagenet-1k``, ``mnist``, ...), compared with the target after
:func:`normalize_domain`.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pydantic import ValidationError, model_validator

from orchestrator.config import ConfigError, SourceEntry, Strict

log = logging.getLogger(__name__)

#: Other spellings of a domain (task names, data formats) -> the domain name sources use in ``trained_on``.
DOMAIN_ALIASES = {"mnist_csv": "mnist", "mnist_5k": "mnist", "fashion_mnist_idx": "fashion_mnist",
                  "fashionmnist": "fashion_mnist", "digits": "sklearn_digits", "imagenet": "imagenet-1k",
                  "imagenet1k": "imagenet-1k", "lfw": "lfw_faces"}


class LabelLeakError(ConfigError):
    """A zoo source trained on the target task's own labels; the message names the source and the fix."""


SourceConfig = SourceEntry  # one source model of the zoo (the ``sources.zoo`` entries of the pipeline config)


class ZooConfig(Strict):
    """The zoo: at least one source, names unique. Raises pydantic ValidationError (a ValueError) otherwise."""

    sources: list[SourceConfig]

    @model_validator(mode="after")
    def _check(self):
        if not self.sources:
            raise ValueError("zoo.sources is empty; list at least one source model "
                             "(e.g. {name: lite0, id: pypi/efficientnet_lite0, trained_on: imagenet-1k})")
        counts = Counter(s.name for s in self.sources)
        dup = sorted(n for n, k in counts.items() if k > 1)
        if dup:
            raise ValueError(f"zoo.sources has duplicate names {dup}; give every source a unique name")
        return self

    def names(self) -> list[str]:
        """The sources' names, in order."""
        return [s.name for s in self.sources]

    def get(self, name: str) -> SourceConfig:
        """The source called ``name``. Raises KeyError naming the valid names."""
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"zoo has no source {name!r}; sources: {', '.join(self.names())}")


def normalize_domain(name: str) -> str:
    """Canonical domain name: lower case, ``-``/spaces -> ``_`` (except ``imagenet-1k``), a ``_smoke`` task suffix
    dropped, :data:`DOMAIN_ALIASES` applied (``mnist_csv`` -> ``mnist``, ``Fashion-MNIST`` -> ``fashion_mnist``)."""
    n = name.strip().lower().replace(" ", "_")
    n = n if n.startswith("imagenet") else n.replace("-", "_")
    n = n[:-len("_smoke")] if n.endswith("_smoke") else n
    return DOMAIN_ALIASES.get(n, n)


def check_label_leak(zoo: ZooConfig, target_name: str) -> None:
    """Raise LabelLeakError if any source's ``trained_on`` is the target's domain (compared by
    :func:`normalize_domain`, so the ``mnist`` task and an ``mnist_csv`` source clash). Sources with unknown
    ``trained_on`` pass, with a warning (the rule cannot be checked for them)."""
    target = normalize_domain(target_name)
    leaks = [s.name for s in zoo.sources if s.trained_on and normalize_domain(s.trained_on) == target]
    if leaks:
        raise LabelLeakError(f"zoo sources {leaks} were trained on {target!r}, the target task's own labels: a "
                             "source must come from another domain. Fix: remove them from the zoo (or build it "
                             f"with build_demo_zoo(..., target_name={target_name!r}), which leaves them out)")
    unknown = [s.name for s in zoo.sources if not s.trained_on]
    if unknown:
        log.warning("zoo sources %s do not say what they were trained on (trained_on); the label-leak rule "
                    "cannot be checked for them", unknown)


def load_zoo(path: str | Path) -> ZooConfig:
    """Read a zoo YAML file (``sources: [...]``, see :mod:`orchestrator.zoo`). Raises ConfigError naming the
    file and the problem (missing file, malformed YAML with its line, unknown key, duplicate names, no source)."""
    from orchestrator.config import _explain, load_yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"zoo file {p} does not exist; write one (see the orchestrator.zoo docs)")
    try:
        return ZooConfig.model_validate(load_yaml(p))
    except ValidationError as e:
        raise _explain(e, f"zoo file {p}") from None
