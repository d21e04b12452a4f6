"""A ``recon.operators`` operator seen by sigpy: ``OperatorLinop``, a ``sigpy.linop.Linop`` on
real numpy arrays, through which the classical baselines (``recon.classical.baselines``) run sigpy's
solvers. Every sigpy iteration applies it, so it is where a cancelled job stops them
(``recon.classical.cancellation``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sigpy as sp
import torch

from recon.classical.cancellation import check_cancelled
from recon.classical.linalg import real_adjoint


class OperatorLinop(sp.linop.Linop):
    """A ``recon.operators`` operator as a sigpy ``Linop`` on real numpy arrays.

    ``forward``: real image ``(B, 1, H, W)`` -> ``A x`` (complex as trailing real pairs);
    ``adjoint``: ``v -> Re(A^H v)``, the adjoint for the real inner product. The operator
    computes on ``device`` (where its mask/kernel live); arrays cross to it and back.
    """

    def __init__(self, operator, ishape: Sequence[int], adjoint: bool = False,
                 device: torch.device | str = "cpu"):
        self.operator, self.device = operator, torch.device(device)
        probe = operator.forward(torch.zeros(tuple(ishape), device=self.device))
        self.complex = probe.is_complex()
        yshape = tuple(probe.shape) + ((2,) if self.complex else ())
        self.is_adjoint = adjoint
        oshape, ishape = (tuple(ishape), yshape) if adjoint else (yshape, tuple(ishape))
        super().__init__(oshape, ishape)

    def _apply(self, input):
        check_cancelled()  # every sigpy iteration applies A or A^H
        v = torch.from_numpy(np.ascontiguousarray(input)).to(self.device)
        with torch.no_grad():
            if self.is_adjoint:
                if self.complex:
                    v = torch.view_as_complex(v.contiguous())
                out = real_adjoint(self.operator, v)
            else:
                out = self.operator.forward(v)
                if out.is_complex():
                    out = torch.view_as_real(out)
        return out.cpu().numpy().astype(input.dtype, copy=False)

    def _adjoint_linop(self):
        image = self.oshape if self.is_adjoint else self.ishape
        return OperatorLinop(self.operator, image, adjoint=not self.is_adjoint, device=self.device)
