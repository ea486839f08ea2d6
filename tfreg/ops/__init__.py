"""tfreg's numerics core: every piece of registration mathematics lives once in this package.

Modules (each small, one job): `fourier` (periodic Fourier-domain filtering of fields, Gaussian and
multi-Gaussian smoothers), `inverse` (fixed-point inversion of a displacement field and its
inverse-consistency residual), `advection` (RK4 map advection under a velocity field), `mk_lncc`
(multi-kernel local NCC with strided, dilated windows). Layers, losses, instance optimisation and
plugins import from here; nothing re-implements it.
"""
