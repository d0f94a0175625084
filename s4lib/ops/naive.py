"""The 'naive' backend: the reference oracle used as a backend (materialises (B, N, L))."""

from .reference import cauchy_ref, log_vandermonde_ref, log_vandermonde_transpose_ref


class _Naive:
    name = "naive"

    def status(self):
        return True, "pure PyTorch, always available (O(B*N*L) memory)"

    def supports(self, op, *tensors):
        return None

    cauchy = staticmethod(cauchy_ref)
    log_vandermonde = staticmethod(log_vandermonde_ref)
    log_vandermonde_transpose = staticmethod(log_vandermonde_transpose_ref)


BACKEND = _Naive()
