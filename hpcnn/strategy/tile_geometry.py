"""The tile a layer's cost is priced by, for every configuration.

Under a configuration the tiles of a layer differ a little (the split rule
gives the first chunks one element more; the edges of an image have less
halo).  The cost model prices a layer by its *representative* tile: along
each output axis the chunk whose input interval is the largest (then whose
output is the largest), so that halos are counted.  Its key (``tile_key``)
is what machine files store measured times under.
"""
from __future__ import annotations

import json

import numpy as np

from hpcnn.parallel.input_geometry import InputGeometry, NotSeparable
from hpcnn.parallel.layout import split_bounds
from hpcnn.parallel.overlap import chunk_bounds

__all__ = ["NodeGeometry", "tile_key", "inputs_from_input", "NotSeparable"]


def tile_key(node, in_tiles, out_tile, dtype: str, from_input=()) -> str:
    """Key of an op at one tile shape in a machine's measured table.
    ``from_input``: per input, whether it is the network's input, whose
    gradient the runtime does not compute (and which arrives in C order),
    so that such a tile (a first convolution without its dX) has a key of
    its own, apart from the same op and shape deeper in a network."""
    key = [node.kind, node.op.attrs(), [list(s) for s in in_tiles], list(out_tile), dtype]
    if any(from_input):
        key.append({"from_input": [bool(f) for f in from_input]})
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def inputs_from_input(graph, node) -> tuple:
    """Per input of ``node``: whether it is ``graph``'s input."""
    return tuple(graph[src].kind == "input" for src in node.inputs)


class NodeGeometry:
    """Every input's ``InputGeometry`` of a node, and its representative
    tile per configuration."""

    def __init__(self, node):
        self.node = node
        self.out = tuple(node.shape)
        self.inputs = [InputGeometry(node.op, i, node.in_shapes, node.shape) for i in range(len(node.inputs))]
        self._chunk: dict = {}

    def chunk(self, d: int, D: int) -> int:
        """The representative chunk along output axis ``d`` split ``D`` ways."""
        key = (d, D)
        if key not in self._chunk:
            lo, hi = chunk_bounds(self.out[d], D)
            own = hi - lo
            need = np.zeros(D, dtype=np.int64)
            for g in self.inputs:
                for e, dd in enumerate(g.dep):
                    if dd == d:
                        nlo, nhi = g.need_bounds(e, D)
                        need += np.asarray(nhi, dtype=np.int64) - np.asarray(nlo, dtype=np.int64)
            # the chunk that reads most, then the largest, then the first
            best = need == need.max()
            best &= own == own[best].max()
            self._chunk[key] = int(np.argmax(best))
        return self._chunk[key]

    def tile(self, degrees):
        """(input tile shapes, output tile shape, output box) of the
        representative tile under ``degrees``."""
        degrees = tuple(int(x) for x in degrees)
        chunks = [self.chunk(d, D) for d, D in enumerate(degrees)]
        obox = tuple(split_bounds(s, D)[c] for s, D, c in zip(self.out, degrees, chunks))
        out_tile = tuple(hi - lo for lo, hi in obox)
        in_tiles = []
        for g in self.inputs:
            t = []
            for e, dd in enumerate(g.dep):
                lo, hi = g.need_bounds(e, 1 if dd is None else degrees[dd])
                j = 0 if dd is None else chunks[dd]
                t.append(int(hi[j] - lo[j]))
            in_tiles.append(tuple(t))
        return in_tiles, out_tile, obox

    def tile_arrays(self, configs: np.ndarray):
        """Per configuration row: output tile elements, input tile elements
        (all inputs), and the tile shapes as an int matrix (the input
        shapes then the output shape, one row each)."""
        C, nd = configs.shape
        cols_out, cols_in = [], [[None] * len(g.shape) for g in self.inputs]
        for d in range(nd):
            Dv, inv = np.unique(configs[:, d], return_inverse=True)
            outlen = np.zeros(len(Dv), dtype=np.int64)
            inlen = {(i, e): np.zeros(len(Dv), dtype=np.int64)
                     for i, g in enumerate(self.inputs) for e, dd in enumerate(g.dep) if dd == d}
            for x, D in enumerate(Dv):
                jj = self.chunk(d, int(D))
                lo, hi = split_bounds(self.out[d], int(D))[jj]
                outlen[x] = hi - lo
                for (i, e) in inlen:
                    nlo, nhi = self.inputs[i].need_bounds(e, int(D))
                    inlen[(i, e)][x] = nhi[jj] - nlo[jj]
            cols_out.append(outlen[inv.reshape(-1)])
            for (i, e), v in inlen.items():
                cols_in[i][e] = v[inv.reshape(-1)]
        for i, g in enumerate(self.inputs):
            for e, dd in enumerate(g.dep):
                if dd is None:
                    lo, hi = g.need_bounds(e, 1)
                    cols_in[i][e] = np.full(C, int(hi[0] - lo[0]), dtype=np.int64)
        out_el = np.prod(np.stack(cols_out, axis=1).astype(np.float64), axis=1)
        flat = [np.stack(cols_in[i], axis=1) for i in range(len(self.inputs))]
        in_el = np.zeros(C)
        for arr in flat:
            in_el += np.prod(arr.astype(np.float64), axis=1)
        shapes = np.concatenate(flat + [np.stack(cols_out, axis=1)], axis=1)
        return out_el, in_el, shapes

    def split_shapes(self, row) -> tuple[list, tuple]:
        """(input tile shapes, output tile shape) from a row of
        ``tile_arrays``' shape matrix."""
        ins, pos = [], 0
        for s in self.node.in_shapes:
            ins.append(tuple(int(x) for x in row[pos:pos + len(s)]))
            pos += len(s)
        return ins, tuple(int(x) for x in row[pos:])

    def region_elements(self, i: int, configs: np.ndarray) -> np.ndarray:
        """Elements of input ``i``'s region that the representative tile
        reads, per configuration row."""
        _, _, shapes = self.tile_arrays(np.asarray(configs, dtype=np.int64).reshape(-1, len(self.out)))
        pos = sum(len(s) for s in self.node.in_shapes[:i])
        cols = shapes[:, pos:pos + len(self.node.in_shapes[i])]
        return np.prod(cols.astype(np.float64), axis=1)
