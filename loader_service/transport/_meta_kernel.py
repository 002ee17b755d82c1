"""A batch's ``SampleMeta`` messages as protobuf wire bytes, in one compiled call (``grpc_bytes.add_sample_meta``).

Made one by one (``batch.samples.add(slide_id=..., ...)``), the 64 messages of a batch were ~12 field
conversions each under the GIL: ~4 µs per patch in the service, more than any other step of a batch's message.
A sample of a :class:`~loader_service.sampling.SampleRun` differs from the others of its slide only in
``x``, ``y`` and ``index``; so each slide's shared fields are serialised once by protobuf itself (a
template), and this kernel writes each sample as ``Batch.samples`` entry: its template, then those three fields
(proto3: omitted when 0, as protobuf omits them). ``Batch.MergeFromString`` of the result then appends them
all in one C call. The wire format is protobuf's (tag = field << 3 | wire type; varints of 7 bits, low first;
negative int64 as 10 bytes of two's complement); ``tests/test_transport_meta.py`` compares the messages with
those made field by field.
"""

from __future__ import annotations

import numpy as np

from loader_service._numba_jit import eager_jit

__all__ = ["encode_run_meta", "MAX_EXTRA_BYTES"]

#: the most bytes a sample adds to its template: the entry's tag and length, three tagged 10-byte varints
MAX_EXTRA_BYTES = 1 + 5 + 3 * 11
_BATCH_SAMPLES_TAG = 5 << 3 | 2  # Batch.samples = 5, length-delimited
_X_TAG, _Y_TAG, _INDEX_TAG = 4 << 3, 5 << 3, 10 << 3  # SampleMeta.x = 4, y = 5, index = 10: varints


@eager_jit("int64(uint64)")
def _varint_size(v):  # type: ignore[no-untyped-def]
    n = 1
    while v >= 0x80:
        v >>= np.uint64(7)
        n += 1
    return n


@eager_jit("int64(uint8[::1], int64, uint64)")
def _put_varint(out, p, v):  # type: ignore[no-untyped-def]
    while v >= 0x80:
        out[p] = np.uint8((v & np.uint64(0x7F)) | np.uint64(0x80))
        v >>= np.uint64(7)
        p += 1
    out[p] = np.uint8(v)
    return p + 1


@eager_jit("int64(uint8[::1], int64[::1], int64[::1], int64[::1], int64[::1], int64[::1], uint8[::1])")
def encode_run_meta(templates, starts, which, x, y, index, out):  # type: ignore[no-untyped-def]
    """Write one ``Batch.samples`` entry per sample n into ``out``: template ``which[n]``
    (``templates[starts[t]:starts[t + 1]]``), then ``x[n]``, ``y[n]``, ``index[n]`` where not 0. Returns the
    bytes written. ``out`` holds at least the templates' sizes plus :data:`MAX_EXTRA_BYTES` per sample."""
    p = 0
    for n in range(which.shape[0]):
        t0, t1 = starts[which[n]], starts[which[n] + 1]
        body = t1 - t0
        values = (np.uint64(x[n]), np.uint64(y[n]), np.uint64(index[n]))
        for v in values:
            if v != 0:
                body += 1 + _varint_size(v)
        out[p] = _BATCH_SAMPLES_TAG
        p = _put_varint(out, p + 1, np.uint64(body))
        out[p:p + t1 - t0] = templates[t0:t1]
        p += t1 - t0
        tags = (_X_TAG, _Y_TAG, _INDEX_TAG)
        for k in range(3):
            if values[k] != 0:
                out[p] = tags[k]
                p = _put_varint(out, p + 1, values[k])
    return p
