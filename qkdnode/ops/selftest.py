"""Known-answer self-tests run at daemon start-up: a failure stops the node before it serves.

Each test recomputes a fixed vector with the production code path and compares it in constant
time, then checks that a corrupted input is rejected (so a verifier that accepts everything
fails too). Provenance of every vector:

- HMAC-SHA256: RFC 4231, test cases 1 and 2 (the frame MACs and handshake proofs use it);
- Ed25519: RFC 8032, section 7.1, TEST 1 and TEST 2 (certificate bootstrap signatures);
- ML-DSA-65 (FIPS 204): key pair from the 32-byte seed 00 01 .. 1f; the SHA-256 of the public
  key and one (hedged, hence non-reproducible) signature were produced once with pyca/cryptography
  50.0.2 and pinned. This is a regression pin, not an independent published vector: replace it by
  a NIST ACVP ML-DSA-65 sigVer vector when one is available offline;
- GF(2^128) Wegman-Carter hash (``channel.polyhash``), the Mersenne-prime verification hash
  (``postprocess.verification``) and Toeplitz hashing (``postprocess.amplification``): our own
  constructions; the vectors were computed by the naive reference implementations in
  ``tests/reliability/naive.py`` (``python -m tests.reliability.naive`` prints them) and pinned;
  ``tests/reliability/test_scenario_17_selftest.py`` re-derives them and fails if they drift.

``run_self_tests()`` raises :class:`SelfTestFailed` naming the first failing test; it takes a few
milliseconds. Messages name the test, never a value.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from typing import Final

import numpy as np

from qkdnode.errors import QkdError


class SelfTestFailed(QkdError):
    """A start-up known-answer test failed: the node must not start."""

    def __init__(self, test: str, reason: str) -> None:
        self.test = test
        super().__init__(f"self-test {test} failed: {reason}")


# ---- vectors ------------------------------------------------------------------------------------

# RFC 4231, 4.2 (test case 1) and 4.3 (test case 2): (key, data, HMAC-SHA-256)
_HMAC_VECTORS: Final = (
    (
        bytes([0x0B] * 20),
        b"Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
)

# RFC 8032, 7.1: (public key, message, signature)
_ED25519_VECTORS: Final = (
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9"
        "b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f1"
        "1d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
)

_MLDSA_SEED: Final = bytes(range(32))
_MLDSA_PUBLIC_SHA256: Final = "d666806e11cee19a7c989f7445f90dd419cf4d2d51db8c0fdb4c0f0a542238c9"
_MLDSA_MESSAGE: Final = b"qkdnode ML-DSA-65 self-test"
_MLDSA_SIGNATURE: Final = (
    "4cacd7cdffe3cb9ab790934f91bd7edd29fc515201a3b905cdc619b4a488265791971cb13906945cfc0544a4"
    "7232ddd8fd9e132ee9ec44498575388f3f33ee9165f9b29569ad565b0d5a65bbd5ce3d283df310d954ca2b07"
    "54aeea5118b2896e4ff2a90e5c71a97ba5cac4fb5b0a2bfacf20b9e48b94d25c82a484a1529656a438c4c17e"
    "389396621724d96fc3d935d4db1439a279e35b5d4c69bd3b0bf02880681939de7fa89f7addff9a82e5577414"
    "2199727251e79a12a9112bc7d48ad519fccfde2b4878b21a2a8deabc1e4067bfeed3abcacabe4c3fdd6e9b47"
    "6334c464cc4604b2fa00a9394347d63931a9f225d358b73dd44ad7eed1370afb7cea726ffe809a0f356b20c4"
    "07b679224a20cdd6ccaadb92bb39db40409cbd83beb398941468d75442379f08d626f46b43eb729a2bf06b47"
    "40fb28dc6acc51dd9c3c5182220cee7c368b27a7e78bdc918757eb025a8eede1eb49f426d398cd61b3ea97f9"
    "8b2308f299923d7d9055b0cccf919f3656db756b0020ffa39693d0ca534b188c4b65d0cf198c97afe13e7573"
    "4a72b1a50bfadf36bd1d4d82897105fcd79698545a5ba60c839621dc8777b142f97305994eba7b04bf7a05f3"
    "fd1c721aa3f41be6173de0955e0faa7e359ce662d017d5e131239e0a51ef2f7bd79f76d96ae0b3af3cf39904"
    "e044f41e16a7d76c92e0d54a4f6c1bf812f8b6b089beda1ef1d1837a761479070b10073d3b9ba7538ec46622"
    "ed5d32af765bfd8825259b2f951868b41b391c281797769bd3504dae672dcf14e34d698f1d9e840d47d4a2eb"
    "408bfbefc9b47a07ea9c9b1c28b392949dc439b14f1ddc87bd15dda446dc272986f3222a1b022f538e4f4e3a"
    "2481b43138fcb9ac11b9197fbab0bb60a2a68cf0a07450f373427d13399879f3e475a7c046196cf8c39c1a58"
    "cf316b8aa228f90ed966e814488bd46a58405821991be11f74a33f61c4b0ce9991db6d2f9ddacc0d558c4cdc"
    "a747472c01ec2d5eeec765a0c27d4654d8b6480627e44b051445d8eac7515064e78351a405577020608062b2"
    "beed07182eccddc5fc977308f24c4021eff1f9775a7bbd01b1ae3427572047cce2ddb77f4dfe9495d0418445"
    "160e04cd5cd409e56c37dac0f74ca38c3639b6f724464c96e1cbb7f70537e3082920255cd4d8a693995baa5f"
    "ad30da2a8a7893e2fd2038b72b0a0782919aba8b5d2a1fcb8d6c277060ee1aabd47c139ba0be369f28250849"
    "aeacb2d13ab1a54781cba5b46e5e28f870d95d3b37a3e8bec40e372b758ad22bc8a4f6b24d35cce2d21d9fea"
    "81dbc97f3313653afc159db85d1d4cf90909adbc4c8903e137c34c7cd391949e7132b5c21caba774d0041918"
    "8aadb30d3edf0be864cf923af4f372914a1914ec88c8e118fb801a06587e299e2c62992b46fc190d82eac722"
    "d4b75eb9fa27bb1944e2627f2d6ae96a310533fb5b58a2996c61dbe7ea260b956ba3bbb9f21f4787de73f82a"
    "25464c7e9fa939f7526df8332af2524c6393a2df85fdbd7444e42f4afc2660ebd7f68d24d51d50a0cb89b2ff"
    "dc2326ff89eaa6ea0c7aadf77be9cc75036b88901a7a7337f8d30f92d4a255e40d573b897403521d59ca07ff"
    "ec5d5910ecd9a0ce29d99ef82103d31d8214572072d842350ec5ee481aff371d792356130422dc53afb7865b"
    "51b0654e59acbf1c3ccc2550a3bc12138585a9766214bb0ff21359863572891ae8ebd4340b038063e6d0a9c2"
    "77679f837eb1bbfe6ed69d82362aec0e8f8bb46b1bdfda2a58b7085a32aee79ac3f7fa1c4cdddebd074d92b8"
    "e4fb1fa6b07fb399293e4c4638eeaa0af8087a84fe40e88f266743240513fecbee68fb2ab6b26fded37f69a2"
    "6b87b8a83ef180edaf35ac0804c144ae81395c802dcd941cfec0765d417b5bfd223089423b33cbf73a216e17"
    "6f605779eec7019ccd8088276ba1a3522efde1415e5078e8ade182b3de08d1b6cd5c2f3f22904cef673f910e"
    "ee40863f39942152667b9fcb5345251ca26cf625c38a8477c13a11b40a6c25e74e44a8d73d825537763c66e0"
    "6a93e456f6441741507d62dec5e0fa4cfe3f06eed9ba3fb93134c667a2088122acddd512eb60ae53d9afa088"
    "b8c2a46ed2e6d5e369f4637e6b63bf32c2e5d8ab45f3af6c4bbf68f235366cc090953e4c357ff1b757cd4fb2"
    "d80ba4a9e00c0175127bd4b5f01530a46223ec128c723fa96fcad3470d97d5ccca5c2a117853436c1d29111e"
    "e220e6005afc8e20debf81a281639666f6c48cb04caeaa13a1f252104f6ac69e8bad2d67b756bc9b0d626f7f"
    "91c3820744ac3ed5d210caa20d9d30b23d2356b5184a8e632632abd31eff223aa5cae91bf69b018003ca5024"
    "4739e00f28394d3665ee65548772df5449b625bdfa7bdc4b0c01e33e2018ef10a6624c1acfe88e2fad249711"
    "b65ef631aa3541c5564009b8cbae28fd575c1a783aa7e63aa3e89fa2de08a101d8efee7cca08bb2fa6dbeac6"
    "76f2221ee74a5297e8d061555c85b801b654c49167b6b6a0ab17b0d1e266a70ec7a0292a2c1145a6ce198a5d"
    "9b5f0d4c1dbe9e7066f495bee78bc1b95dfd17050382c7c12c9066b3320372b78c752be5f96f636c592e3112"
    "b874eb3e1910becd3b8d905d353fb8ef06bddcae9cde4d97568e4b4e7170a1ad8312a70f05f9f8484d97fd6c"
    "1b4019026114bb3f2636c97c07dfe46d9b7d6ec696fa759159e6b3ed28d34d6e5341193ea7681f239408e7eb"
    "d2c0826f2343c22e7c716b88efc7f350cfa5cc23b6057737efc96b9b9bca958a61a02ae58fcffaa41bd924ed"
    "fcb0671398b3ee457b3ad23cbd53b522a280d3f5194c99e4929b3a1973e033175a5c8ca69df0c781c4db6300"
    "570e978c60b5a813121f7d255ae52c29ce0b9ee4addbbd6f1f0fbc193b1e1b4f58e36a81ac75d02c04552b4d"
    "2bf5b4365f7bf6239b45c3ba51d325585252034233718aebf19ae276a831a13b2bbc9eca098e26bb96182bb2"
    "fce9f7889d79dc7b16a4b6f2258c76e0b4d44b7fa18818267ac64bd2a6ae0c4d2190e943418e85ccb4c2efe9"
    "f35be862b87a0b00642db7e0d5fa01988954310d87c4769fc93bedddf030de0063b7a1efd1bf82be6846e396"
    "d72a448919c8d684c7a24484f5cb7ef54c797f1d5306c32883f24bd9f076ba64e71350a7bbc7cab19ee3f463"
    "775f66145ed20b32a4720f2c38853586402aafd32ba4f49c31fa9e61af39d9d6f6e600455e5492bc890790af"
    "68e3753ced74b34e448ca2739b33c331e922b5dad1ceb88e6c5ccad066cf92e23051b52557567aeaf48ff175"
    "d1d2d94804103b445d9eb7b48cbd75621e9db681e678034144ea8af6c4244f8f07620dd44cc27687aad0720c"
    "f09e688f85419c8ea887674ab8d1c8d78f4c30bd62a233db8059f5e61059fd2a91d5fd69a7b6f7ce66f6924f"
    "fcff4a9e90e705729e5663176aae67337938f940f0ebd21d6ee7b79cadc8fd9f0afbdafe47a62879128511a4"
    "c77d135c48feb1cc1ddd987f867b23fa722ebf2925d7878ba4a6aa622426ace24c61fa5be698e1a05295c108"
    "930316dc1f51fffaf0988ef2f2034faf5dc6dda222391e321a8ce560a8f9db74df8a1fd537b2eda2c44f0b53"
    "2e62b4db3398b5a6b42497ab3d7f3c9607fd6d62a5df55fb654e63fefe6dc027a8deff4a9139bf08e4fe36b4"
    "a1d98a78641858ae48490de908eb3f638322640805f5424a252a40f81272e68231750824c1eec90366a4ccb3"
    "872b1b46f9ea0fcb1de56e30c74b232209fd5863f68de8daf4c051f9a089e699e790e060abc6f039b263de5c"
    "4ff3f2b3a0a00a02400e7ba78021a3215fe2a52e6e11ad16a58f49dcde91d32221018719d6ba823002226905"
    "7e7f9d9d20cbb5bcb8e921a4a2b18342b85aa2444f673e47fa3616e870928334c52e986be7b6a6c74aee4fd8"
    "fa62e397e734b9ec30ab24725e7849fefb5b9b2579e8a4aef16c114a154d1e1e1e1de33bd8171cbdf8555787"
    "b9c486fd12a0407e1d07e03d31f520b298cf059814a418b4034eb6c8c0948f10a8b8044257834ed8775b2d0d"
    "3fee17397e338748c4d36ffcfa875592bd587128e7c1cfafd4058f06545b3a71c912beeaa4913aa7872da67d"
    "3e4f8c9981c2f52d51650d5e11a1f34ce749f81186e1e01800cf52508a76961d0a26161c343bf250529305d2"
    "b3e87445ec37d7ab7fe073983de744334301c7365e6eca60f05b4f5e2771b4fe3a4f2d31caf6e04697ce7061"
    "5aab085f1f09e59b76d90afe8ac3f6be8ff7ff59cccbd703b7b1a71e03e4bed80b81887988073120910ccc8c"
    "c8365a457afd76a380848c606bcda815321082078e118a1b06bd06b3769f87f42bfa81d7b753680c4b419018"
    "f4fd66e688ca325307c1fe2c7bd8f58597334c7777d47a1c76072f015728f0f744b6e2ca5e6ea01633b63246"
    "ee859c2835afe20bad844178490072d16e1cb4bed2d654f1fdc76eecf98aa09a7441a11daa7a85a69defac7c"
    "c4aeef2e65a69ced3588ec828003e3cdd810bd812ee5781666d1367f03226f1bfc25960de92cb671a57f829c"
    "c0fcc26de85ace10e77ce621ff6178ad134b3e455255c247a7a331d437b5656a07dd47ca383c7696d30c1326"
    "6e96b0b2cb585abc57a208558aa1cddc0c445293a6abaef70000000000000000000000000000000000000000"
    "000000050d10121820"
)

# Inputs of our own constructions (mirrored in tests/reliability/naive.py) and pinned outputs.
POLY128_KEY: Final = bytes(range(16))
POLY128_RECORDS: Final = (b"", b"abc", bytes(range(40)))
POLY128_PAD: Final = bytes(range(16, 32))
POLY128_HASH: Final = "8455d265716f9d7ed9a8710a6800a121"
POLY128_TAG: Final = "9444c076657a8b69c1b16b11741dbf3e"
MERSENNE_DATA: Final = bytes((7 * i + 3) % 256 for i in range(38))
MERSENNE_BITS: Final = 300
MERSENNE_VECTORS: Final = (
    (61, 0x0123456789ABCDEF % ((1 << 61) - 1), "1724f99cccc1d20"),
    (127, (1 << 126) + 0x1234567, "663636363637f014b0fb0e4b7060c3cb"),
)
TOEPLITZ_INPUT: Final = bytes((13 * i + 5) % 256 for i in range(8))
TOEPLITZ_SEED: Final = bytes((29 * i + 11) % 256 for i in range(11))
TOEPLITZ_N: Final = 64
TOEPLITZ_M: Final = 24
TOEPLITZ_OUTPUT: Final = "11fe10"


# ---- the tests --------------------------------------------------------------------------------


def _same(name: str, got: bytes, expected_hex: str) -> None:
    if not hmac.compare_digest(got, bytes.fromhex(expected_hex)):
        raise SelfTestFailed(name, "output differs from the known answer")


def _bits(data: bytes, count: int) -> np.ndarray[tuple[int], np.dtype[np.uint8]]:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count].copy()


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def check_hmac_sha256() -> None:
    for key, data, expected in _HMAC_VECTORS:
        _same("hmac_sha256", hmac.new(key, data, "sha256").digest(), expected)


def check_polyhash_gf128() -> None:
    from qkdnode.channel.polyhash import PolyHash, verify_tag, wegman_carter_tag

    hasher = PolyHash(POLY128_KEY)
    for record in POLY128_RECORDS:
        hasher.absorb(record)
    value = hasher.finish()
    _same("polyhash_gf128", value, POLY128_HASH)
    tag = wegman_carter_tag(value, POLY128_PAD)
    _same("polyhash_gf128", tag, POLY128_TAG)
    _expect_rejection("polyhash_gf128", lambda: verify_tag(tag, _flip_first_byte(tag)))


def check_verification_hash() -> None:
    from qkdnode.postprocess.verification import polynomial_hash

    bits = _bits(MERSENNE_DATA, MERSENNE_BITS)
    for field_bits, key, expected in MERSENNE_VECTORS:
        value = polynomial_hash(bits, key, field_bits)
        _same("verification_hash", value.to_bytes(64, "big"), expected.rjust(128, "0"))
    flipped = bits.copy()
    flipped[0] ^= 1
    field_bits, key, expected = MERSENNE_VECTORS[0]
    if polynomial_hash(flipped, key, field_bits) == int(expected, 16):
        raise SelfTestFailed("verification_hash", "a changed input gives the same hash")


def check_toeplitz() -> None:
    from qkdnode.postprocess.amplification import toeplitz_hash

    out = toeplitz_hash(
        _bits(TOEPLITZ_INPUT, TOEPLITZ_N),
        _bits(TOEPLITZ_SEED, TOEPLITZ_N + TOEPLITZ_M - 1),
        TOEPLITZ_M,
    )
    _same("toeplitz", np.packbits(out, bitorder="little").tobytes(), TOEPLITZ_OUTPUT)


def check_ed25519() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from qkdnode.channel.pki import verify_signature

    for public_hex, message_hex, signature_hex in _ED25519_VECTORS:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        message, signature = bytes.fromhex(message_hex), bytes.fromhex(signature_hex)
        bad = _flip_first_byte(signature)
        _expect_accepted("ed25519", functools.partial(verify_signature, key, signature, message))
        _expect_rejection("ed25519", functools.partial(verify_signature, key, bad, message))


def check_mldsa65() -> None:
    from cryptography.hazmat.primitives.asymmetric import mldsa

    from qkdnode.channel.pki import verify_signature

    public = mldsa.MLDSA65PrivateKey.from_seed_bytes(_MLDSA_SEED).public_key()
    _same("ml_dsa_65", hashlib.sha256(public.public_bytes_raw()).digest(), _MLDSA_PUBLIC_SHA256)
    signature = bytes.fromhex(_MLDSA_SIGNATURE)
    _expect_accepted("ml_dsa_65", lambda: verify_signature(public, signature, _MLDSA_MESSAGE))
    _expect_rejection(
        "ml_dsa_65",
        lambda: verify_signature(public, signature, _flip_first_byte(_MLDSA_MESSAGE)),
    )


def _expect_accepted(name: str, check: Callable[[], None]) -> None:
    try:
        check()
    except QkdError:
        raise SelfTestFailed(name, "a known-good value was rejected") from None


def _expect_rejection(name: str, check: Callable[[], None]) -> None:
    from qkdnode.errors import AuthenticationFailed

    try:
        check()
    except AuthenticationFailed:
        return
    raise SelfTestFailed(name, "a corrupted value was accepted")


SELF_TESTS: Final[tuple[tuple[str, Callable[[], None]], ...]] = (
    ("hmac_sha256", check_hmac_sha256),
    ("polyhash_gf128", check_polyhash_gf128),
    ("verification_hash", check_verification_hash),
    ("toeplitz", check_toeplitz),
    ("ed25519", check_ed25519),
    ("ml_dsa_65", check_mldsa65),
)


def run_self_tests() -> list[str]:
    """Run every known-answer test; return their names, or raise ``SelfTestFailed``.

    Any unexpected exception inside a test (a broken library, a changed API) counts as a
    failure of that test.
    """
    passed = []
    for name, check in SELF_TESTS:
        try:
            check()
        except SelfTestFailed:
            raise
        except Exception as exc:
            raise SelfTestFailed(name, f"raised {type(exc).__name__}") from exc
        passed.append(name)
    return passed
