"""Secure-aggregation messages as bytes: exact round trips through a real protocol run, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest

from insitu.privacy.secagg import codec
from insitu.privacy.secagg.messages import AdvertiseKeys, MaskedInput, UnmaskRequest
from insitu.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer


def test_every_message_of_a_real_round_survives_encoding_and_the_round_still_decodes():
    cfg = SecAggConfig(n=4, t=3, dim=50, bound=1.0)
    rng = np.random.default_rng(0)
    inputs = {cid: rng.uniform(-1, 1, 50) for cid in cfg.client_ids}
    wire = lambda message: codec.decode(codec.encode(message), type(message))
    clients = {cid: SecAggClient(cid, cfg) for cid in cfg.client_ids}
    server = SecAggServer(cfg)
    keys = [wire(c.advertise_keys()) for c in clients.values()]
    broadcast = wire(server.collect_keys(keys))
    shares = [wire(c.share_keys(broadcast)) for c in clients.values()]
    routed = {cid: wire(msg) for cid, msg in server.route_shares(shares).items()}
    masked = [wire(clients[cid].masked_input(routed[cid], inputs[cid])) for cid in clients]
    request = wire(server.collect_masked(masked))
    responses = [wire(c.unmask(request)) for c in clients.values()]
    total = server.unmask(responses)
    assert np.abs(np.asarray(total) - sum(inputs.values())).max() <= cfg.fixed_point.max_abs_error


def test_decoding_is_strict():
    message = UnmaskRequest(session=7, survivors=(1, 2, 3), dropped=(4,))
    blob = codec.encode(message)
    assert codec.decode(blob) == message
    with pytest.raises(ValueError, match="truncated"):
        codec.decode(blob[:-1])
    with pytest.raises(ValueError, match="trailing"):
        codec.decode(blob + b"\0")
    with pytest.raises(ValueError, match="unknown secure-aggregation message tag"):
        codec.decode(b"\xff" + blob[1:])
    with pytest.raises(ValueError, match="expected a MaskedInput"):
        codec.decode(blob, MaskedInput)
    with pytest.raises(ValueError, match="at most"):
        codec.decode(bytes([blob[0]]) + blob[1:9] + (2**31).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        codec.encode(MaskedInput(client_id=-1, masked=b""))
    with pytest.raises(ValueError, match="not a secure-aggregation message"):
        codec.encode("hello")
    keys = AdvertiseKeys(client_id=3, cipher_public=b"a" * 32, mask_public=b"b" * 32)
    assert codec.decode(codec.encode(keys), AdvertiseKeys) == keys
