"""Diagnostics: sharpness of a model (Hessian, Gauss-Newton, functional-Hessian and preconditioned
spectra, SAM's logit/functional path split). Torch only."""

from samlm.diagnostics.sharpness import (
    functional_hessian_top_eigenvalue,
    gauss_newton_vector_product,
    hessian_vector_product,
    measure_sharpness,
    preconditioned_vector_product,
    preconditioner_tensors,
    sam_path_norms,
    sam_path_split,
    top_eigenvalue,
)

__all__ = [
    "functional_hessian_top_eigenvalue",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "measure_sharpness",
    "preconditioned_vector_product",
    "preconditioner_tensors",
    "sam_path_norms",
    "sam_path_split",
    "top_eigenvalue",
]
