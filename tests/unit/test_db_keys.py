"""API keys: only hashes are stored, revoked keys stop working, revocation is tenant-scoped."""

import hashlib

from sqlalchemy.orm import Session, sessionmaker

from api.db.keys import authenticate, create_api_key, revoke_api_key


def test_key_is_stored_hashed_and_authenticates(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        key, plaintext = create_api_key(session, "alice", "laptop")

    assert plaintext.startswith("tml-") and len(plaintext) == 4 + 43
    assert key.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert key.prefix == plaintext[:12]
    with session_factory() as session:
        found = authenticate(session, plaintext)
        assert found is not None and (found.id, found.owner) == (key.id, "alice")
        assert authenticate(session, plaintext + "x") is None


def test_revoked_key_is_rejected_and_only_its_owner_can_revoke(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        key, plaintext = create_api_key(session, "alice", "ci")

    with session_factory.begin() as session:
        assert not revoke_api_key(session, key.id, "bob", actor="bob")
        assert authenticate(session, plaintext) is not None
        assert revoke_api_key(session, key.id, "alice", actor="alice")
        assert not revoke_api_key(session, key.id, "alice", actor="alice")
    with session_factory() as session:
        assert authenticate(session, plaintext) is None
