import os
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from big.auth import DEV_USER, AuthConfig, Authenticator, mint_token
from big.errors import AuthError

SECRET = "test-secret-with-enough-bytes-for-hs256!"


def hs():
    return Authenticator(AuthConfig(mode="hs256", secret=SECRET))


def test_valid_token_gives_sub():
    assert hs().user_from_parameters({"jwt": {"token": mint_token("alice", SECRET)}}) == "alice"


@pytest.mark.parametrize("params", [{}, {"jwt": {}}, {"jwt": {"token": ""}}, {"jwt": {"token": 5}}])
def test_missing_token(params):
    with pytest.raises(AuthError, match="missing token"):
        hs().user_from_parameters(params)


def test_bad_signature_and_garbage():
    with pytest.raises(AuthError, match="invalid token"):
        hs().verify(mint_token("alice", "another-secret-another-secret-1234"))
    with pytest.raises(AuthError, match="invalid token"):
        hs().verify("not.a.jwt")


def test_expired_token():
    old = mint_token("alice", SECRET, days=1, now=time.time() - 3 * 86400)
    with pytest.raises(AuthError, match="expired"):
        hs().verify(old)


def test_token_without_exp_or_sub_is_rejected():
    no_exp = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    for t in (no_exp, no_sub):
        with pytest.raises(AuthError):
            hs().verify(t)


def test_alg_none_and_alg_confusion_are_rejected():
    none_tok = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(AuthError):
        hs().verify(none_tok)


def test_audience_and_issuer_checked():
    a = Authenticator(AuthConfig(mode="hs256", secret=SECRET, audience="big", issuer="me"))
    assert a.verify(mint_token("bob", SECRET, audience="big", issuer="me")) == "bob"
    with pytest.raises(AuthError):
        a.verify(mint_token("bob", SECRET, audience="other", issuer="me"))


def test_rs256_with_public_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    a = Authenticator(AuthConfig(mode="rs256", public_key=pub))
    assert a.verify(mint_token("carol", priv, algorithm="RS256")) == "carol"
    # An HS256 token signed with the public key as secret must not pass (algorithm confusion).
    forged = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    with pytest.raises(AuthError):
        a.verify(forged)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("BIG_AUTH_MODE", "hs256")
    monkeypatch.setenv("BIG_JWT_SECRET", SECRET)
    a = Authenticator(AuthConfig.from_env())
    assert a.verify(mint_token("dave", SECRET)) == "dave"


def test_misconfiguration_fails_loudly():
    with pytest.raises(ValueError, match="BIG_JWT_SECRET"):
        Authenticator(AuthConfig(mode="hs256"))
    with pytest.raises(ValueError):
        Authenticator(AuthConfig(mode="sometimes"))


def test_disabled_mode_is_explicit():
    assert Authenticator(AuthConfig(mode="disabled")).user_from_parameters({}) == DEV_USER


def _rsa_pair():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, key.public_key()


def test_hubble_backend_offline_with_a_cached_jwk():
    """A Jina Cloud-style token (RS256, kid, embedded user) verified by hubble against its JWKS cache."""
    import json

    from hubble.utils.config import config as hubble_config

    key, pub = _rsa_pair()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(pub))
    jwk.update(kid="big-test-kid", alg="RS256", use="sig")
    hubble_config.set("jwks", [jwk])
    a = Authenticator(AuthConfig(mode="hubble"))
    exp = int(time.time()) + 600

    def token(user, signer=key):
        return jwt.encode({"user": user, "exp": exp}, signer, algorithm="RS256", headers={"kid": "big-test-kid"})

    assert a.verify(token({"_id": "u-123", "status": "active", "nickname": "x"})) == "u-123"
    # Not active: hubble does not trust the embedded user and asks the Hubble API (unreachable here);
    # either way the caller is rejected.
    with pytest.raises(AuthError):
        a.verify(token({"_id": "u-123", "status": "suspended"}))
    other, _ = _rsa_pair()
    with pytest.raises(AuthError):
        a.verify(token({"_id": "u-123", "status": "active"}, signer=other))


def test_only_a_token_with_the_admin_claim_is_an_admin():
    from big.auth import AuthConfig, Authenticator, mint_token
    from big.errors import AuthError

    secret = "admin-secret-0123456789-abcdefghij"
    auth = Authenticator(AuthConfig(mode="hs256", secret=secret))
    assert auth.admin_from_parameters({"jwt": {"token": mint_token("keeper", secret, admin=True)}}) == "keeper"
    assert auth.caller_from_parameters({"jwt": {"token": mint_token("alice", secret)}}) == ("alice", False)
    with pytest.raises(AuthError, match="admin token"):
        auth.admin_from_parameters({"jwt": {"token": mint_token("alice", secret)}})


def test_without_a_secret_the_workspace_makes_one_that_every_process_and_the_mint_command_share(tmp_path, monkeypatch):
    monkeypatch.delenv("BIG_JWT_SECRET", raising=False)
    monkeypatch.delenv("BIG_AUTH_MODE", raising=False)
    from big.auth import SECRET_FILE, workspace_secret

    ws = str(tmp_path / "ws")
    assert workspace_secret(ws, create=False) is None
    first = AuthConfig.from_env(workspace=ws)
    assert first.secret and AuthConfig.from_env(workspace=ws).secret == first.secret  # made once, then read
    assert os.stat(os.path.join(ws, SECRET_FILE)).st_mode & 0o077 == 0  # its owner's only
    assert [p.name for p in (tmp_path / "ws").iterdir()] == [SECRET_FILE]  # no temporary file left
    token = subprocess.run([sys.executable, "-m", "big.auth", "mint", "erin", "--workspace", ws],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Authenticator(first).verify(token) == "erin"
    # A secret given wins over the workspace's.
    monkeypatch.setenv("BIG_JWT_SECRET", SECRET)
    assert AuthConfig.from_env(workspace=ws).secret == SECRET
