"""tfreg's numerics core: every piece of registration mathematics lives once in this package.

Modules (each small, one job): `fourier` (periodic Fourier-domain filtering of fields), `inverse`
(fixed-point inversion of a displacement field and its inverse-consistency residual). Layers, losses,
instance optimisation and plugins import from here; nothing re-implements it.
"""
