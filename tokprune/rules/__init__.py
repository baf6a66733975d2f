"""Model-free selection rules of the pruning methods, as pure tensor functions.

Each module here (``hiprune``, ``visionzip``, ``flowcut``, ``pdrop``, ``transprune``, ``vflowopt``, ``catp``,
``cdpruner``, ``dart``, ``divprune``, ``vispruner``)
holds one method's scoring, counting and selection rules written against plain tensors: attention rows or
statistics, keys, values, hidden states, pixels and grid shapes go in; kept indices, counts, merged features
and their source indices come out. They know nothing about models, hooks or caches: the pruners in
``tokprune/pruners/`` will gather the signals at their seams and call these rules, so that every rule can be
tested on hand-made inputs with known answers and against re-implementations of the reference code. The
choices where a method's reference code and its paper differ are listed in docs/rules.md (the code's
behaviour is the default, the paper's an option). Top-k selections go through
:func:`tokprune.kernels.select_topk` (ties to the lower index, results in ascending token order).
"""

from __future__ import annotations
