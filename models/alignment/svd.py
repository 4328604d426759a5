"""dlib's SVD (svd3 without LAPACK, as dlib-bin is built), ported step for step in double.

The detector replaces each 10x10 filter plane by its low-rank approximation from this SVD
(models/alignment/filters.py); the separable terms equal dlib's bit for bit only with dlib's own algorithm and
operation order, which numpy's LAPACK SVD does not follow.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["dlib_svd"]

# dlib's svd4 gives up after this many iterations on one singular value (it returns an error code).
_MAX_ITERATIONS = 300


def dlib_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dlib's svd3 without LAPACK (dlib-bin has none): the Golub-Reinsch SVD of svd4(SVD_SKINNY_U), in
    double, step for step, so that u, w, v equal dlib's bit for bit (Python floats are IEEE doubles, every
    operation rounded, no FMA, like dlib's build). a is m x n with m >= n; a = u diag(w) v^T, unsorted."""
    m, n = a.shape
    if m < n:
        raise ValueError("dlib_svd needs rows >= columns")
    eps = float(np.finfo(np.float64).eps)
    tol = float(np.finfo(np.float64).tiny) / eps
    u = [[float(v) for v in row] for row in a]
    v = [[0.0] * n for _ in range(n)]
    q = [0.0] * n
    e = [0.0] * n
    g = x = 0.0
    l = 0
    # Householder reduction to bidiagonal form.
    for i in range(n):
        e[i] = g
        s = 0.0
        l = i + 1
        for j in range(i, m):
            s += u[j][i] * u[j][i]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i] = f - g
            for j in range(l, n):
                s = 0.0
                for k in range(i, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
        q[i] = g
        s = 0.0
        for j in range(l, n):
            s += u[i][j] * u[i][j]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i + 1]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i + 1] = f - g
            for j in range(l, n):
                e[j] = u[i][j] / h
            for j in range(l, m):
                s = 0.0
                for k in range(l, n):
                    s += u[j][k] * u[i][k]
                for k in range(l, n):
                    u[j][k] += s * e[k]
        y = abs(q[i]) + abs(e[i])
        if y > x:
            x = y
    # Accumulation of right-hand transformations.
    for i in range(n - 1, -1, -1):
        if g != 0.0:
            h = u[i][i + 1] * g
            for j in range(l, n):
                v[j][i] = u[i][j] / h
            for j in range(l, n):
                s = 0.0
                for k in range(l, n):
                    s += u[i][k] * v[k][j]
                for k in range(l, n):
                    v[k][j] += s * v[k][i]
        for j in range(l, n):
            v[i][j] = v[j][i] = 0.0
        v[i][i] = 1.0
        g = e[i]
        l = i
    # Accumulation of left-hand transformations (skinny u: m x n).
    for i in range(n - 1, -1, -1):
        l = i + 1
        g = q[i]
        for j in range(l, n):
            u[i][j] = 0.0
        if g != 0.0:
            h = u[i][i] * g
            for j in range(l, n):
                s = 0.0
                for k in range(l, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
            for j in range(i, m):
                u[j][i] /= g
        else:
            for j in range(i, m):
                u[j][i] = 0.0
        u[i][i] += 1.0
    # Diagonalisation of the bidiagonal form.
    eps *= x
    for k in range(n - 1, -1, -1):
        iterations = 0
        while True:  # test for splitting
            cancel = False
            for l in range(k, -1, -1):  # noqa: B007 - l is used after the loop, as in dlib
                if abs(e[l]) <= eps:
                    break
                if abs(q[l - 1]) <= eps:
                    cancel = True
                    break
            if cancel:  # cancellation of e[l], l > 0
                c, s = 0.0, 1.0
                l1 = l - 1
                for i in range(l, k + 1):
                    f = s * e[i]
                    e[i] *= c
                    if abs(f) <= eps:
                        break
                    g = q[i]
                    h = q[i] = math.sqrt(f * f + g * g)
                    c = g / h
                    s = -f / h
                    for j in range(m):
                        y = u[j][l1]
                        z = u[j][i]
                        u[j][l1] = y * c + z * s
                        u[j][i] = -y * s + z * c
            z = q[k]  # test for convergence
            if l == k:
                break
            iterations += 1
            if iterations > _MAX_ITERATIONS:
                raise ArithmeticError("dlib_svd: no convergence")  # dlib returns an error code here
            x = q[l]
            y = q[k - 1]
            g = e[k - 1]
            h = e[k]
            f = ((y - z) * (y + z) + (g - h) * (g + h)) / (2 * h * y)
            g = math.sqrt(f * f + 1.0)
            f = ((x - z) * (x + z) + h * (y / ((f - g) if f < 0 else (f + g)) - h)) / x
            c = s = 1.0
            for i in range(l + 1, k + 1):
                g = e[i]
                y = q[i]
                h = s * g
                g *= c
                e[i - 1] = z = math.sqrt(f * f + h * h)
                c = f / z
                s = h / z
                f = x * c + g * s
                g = -x * s + g * c
                h = y * s
                y *= c
                for j in range(n):
                    x = v[j][i - 1]
                    z = v[j][i]
                    v[j][i - 1] = x * c + z * s
                    v[j][i] = -x * s + z * c
                q[i - 1] = z = math.sqrt(f * f + h * h)
                if z != 0:
                    c = f / z
                    s = h / z
                f = c * g + s * y
                x = -s * g + c * y
                for j in range(m):
                    y = u[j][i - 1]
                    z = u[j][i]
                    u[j][i - 1] = y * c + z * s
                    u[j][i] = -y * s + z * c
            e[l] = 0.0
            e[k] = f
            q[k] = x
        if z < 0.0:  # make the singular value non-negative
            q[k] = -z
            for j in range(n):
                v[j][k] = -v[j][k]
    return np.array(u), np.array(q), np.array(v)
