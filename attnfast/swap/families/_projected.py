"""What the families built on ``attnfast.nn.ProjectedSelfAttention2d`` share (not a family itself)."""
from __future__ import annotations

import torch.nn as nn

from ...nn.projected_self_attention import ProjectedSelfAttention2d
from ..family import Candidate, Family, NotSwappable, Spec, require_conv1x1


class ProjectedFamily(Family):
    """A layer whose projections are its own modules: the fused module calls them (``fused_runs``: all of
    them) and replaces the N x N core. ``roles``: (query, key, value) child names; ``post``: output modules."""

    fused = ProjectedSelfAttention2d
    roles: tuple = ()
    post: tuple = ()
    tolerated_methods = frozenset({"reset_parameters"})  # initialisation only; noted when dropped

    def projections(self, m: nn.Module, names: tuple) -> tuple:
        """The named 1x1 convolutions, of any Conv2d class (spectral norm, parametrizations), bias or not."""
        return tuple(require_conv1x1(m._modules[n], n, bias=None, plain=False) for n in names)

    def build(self, m: nn.Module, spec: Spec, candidate: Candidate) -> nn.Module:
        q, k, v = self.roles
        used = (*self.roles, *self.post)
        children = {n: c for n, c in m._modules.items() if n in used}
        gamma = m._parameters.get("gamma")
        try:
            return ProjectedSelfAttention2d(children, query=q, key=k, value=v, post=self.post, gamma=gamma,
                                            **candidate.kwargs)
        except ValueError as e:
            raise NotSwappable(f"ProjectedSelfAttention2d does not accept these options: {e}") from None
