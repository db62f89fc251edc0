"""The model's JSON, as read_card, verify_qr and the `verification` event carry it."""

from __future__ import annotations

from agent.model import IDENTITY_FIELDS, Identity, IdentitySource


def test_identity_json_is_every_field_in_order_then_the_source_and_the_codes_names():
    values = {name: "v-%s" % name for name in IDENTITY_FIELDS}
    values.update(sex="2", nation="03", id_type="01", card_status="1")
    identity = Identity(source=IdentitySource.CACHE, **values)
    out = identity.to_json()
    assert list(out) == [*IDENTITY_FIELDS, "source", "sex_text", "nation_text", "id_type_text", "card_status_text"]
    assert {k: out[k] for k in IDENTITY_FIELDS} == values
    assert out["source"] == "cache"
    assert (out["sex_text"], out["nation_text"], out["id_type_text"]) == ("女性", "回族", "居民身份证")
    assert out["card_status_text"]
    empty = Identity(source=IdentitySource.CARD).to_json()
    assert all(empty[k] is None for k in IDENTITY_FIELDS) and empty["sex_text"] is None
