"""
m2mgw's own MGP/1 test vectors: ``docs/test-vectors/mgp1-m2mgw.json``.

``python -m m2mgw.testvectors [--out FILE] [--check]`` plays, for each of the
five suites, the exchange of the conformance vectors (``docs/spec/vectors.json``,
made by an independent implementation of the module side) with m2mgw's own
code on both sides: the module client
(:class:`~m2mgw.client.module.ModuleEndpoint`) builds every datagram, the
module controller (:class:`~m2mgw.protocol.engine.ModuleController` on a
:class:`~m2mgw.store.memory.MemoryStore`) answers it, and the client accepts
the answer.  It writes the result in exactly the JSON shape of the reference
file, so the tests that check the reference check this file too.

Nothing is random: the PSKs, the EC, X25519 and Ed25519 keys and every random
draw are ``HKDF-SHA-256(salt = SALT, ikm = SEED, info = label, L = size)``
(:func:`derive`), the clock is fixed, ECDSA uses RFC 6979 nonces and Ed25519
is deterministic.  RSA keys cannot be made from random bytes through the
suite API (MGP/1 defines no such derivation), so the four RSA test keys were
generated once and are embedded below.  **These are test keys: every private
key in this module and in the file is public.  Never provision one.**

Each random source hands out draws that the generator names before the code
under test makes them (:class:`NamedDraws`), and records them in the order
drawn; a draw the generator did not expect, or one it expected and that was
not made, stops the generation.  The intermediate values (``Z_es``, PRKs,
keys, TBS, MACs, session keys) are recomputed with
:mod:`m2mgw.protocol.keyschedule` and the suites from the recorded inputs and
checked against the real exchange before anything is written: the module's
datagrams and the gateway's replies decrypt with the recomputed keys, the
signatures verify and are reproduced from the recorded salts, the HELLO
draws reproduce ``epk``, and both endpoints hold the recomputed session keys.
Any disagreement raises :class:`VectorError`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from twisted.internet.defer import Deferred

from m2mgw.client.module import (
    HelloContext,
    KeyState,
    ModuleEndpoint,
    ModuleSession,
    ModuleState,
    Outbox,
    Outgoing,
    PendingKeyReg,
    ReplyOutcome,
    ServerPublicKey,
)
from m2mgw.config import ProtocolPolicy
from m2mgw.crypto.primitives import hkdf, pkcs8_der, pkcs8_pem
from m2mgw.crypto.randomness import ScriptedRandom
from m2mgw.crypto.rsa import KEY_MATERIAL_BYTES
from m2mgw.errors import M2MGWError
from m2mgw.interfaces import ICipherSuite, RandomSource
from m2mgw.protocol import cbor, keyschedule
from m2mgw.protocol.bodies import (
    KIND_SKEY,
    AuthMethod,
    ConfEntry,
    ConfStatus,
    InvalidKeyReg,
    KeyReg,
    KeyRegStatus,
    Payload,
    instruction_wire_size,
    parse_data_body,
    parse_hello_plaintext,
    parse_hello_reply_plaintext,
    parse_reply_body,
    parse_skey_body,
)
from m2mgw.protocol.engine import ModuleController
from m2mgw.protocol.messages import Data, DataReply, Hello, HelloReply, parse_reply, parse_request
from m2mgw.records import InstructionState, KeyStatus, Module, NewInstruction
from m2mgw.registry import lookup
from m2mgw.store.memory import MemoryStore

__all__ = [
    "ANNOUNCED_SKID_OFFSET",
    "CLOCK",
    "DEFAULT_OUT",
    "GENERATOR_VERSION",
    "IDENTITY",
    "POLICY",
    "SEED",
    "SENML",
    "SUITE_SKIDS",
    "NamedDraws",
    "VectorError",
    "derive",
    "generate",
    "main",
    "render",
]

#: The version of this generator; it changes whenever the file it writes does.
GENERATOR_VERSION: Final = "1"
#: Where the vectors live, relative to the repository root.
DEFAULT_OUT: Final = Path("docs/test-vectors/mgp1-m2mgw.json")
#: The seed every PSK, EC/X25519/Ed25519 key and random draw is derived from.
SEED: Final = b"m2mgw MGP/1 test vectors, seed 1: test keys only, never for production"
#: The HKDF salt of :func:`derive`.
SALT: Final = b"m2mgw test vectors"
#: The module identity of every suite's vectors.
IDENTITY: Final = "m2mgw-vector-module"
#: The gateway's clock for every reply, and the module's clock (its first HELLO ``ts``).
CLOCK: Final = 1_767_225_600
#: The ``skid`` of each suite's server key: unique across suites, and not the reference's.
SUITE_SKIDS: Final = {"p256": 21, "p256-ccm8": 22, "p384": 23, "x25519": 24, "rsa": 25}
#: The ``skey`` step announces the server key ``skid + ANNOUNCED_SKID_OFFSET``.
ANNOUNCED_SKID_OFFSET: Final = 100
#: The SenML record every report carries (the reference's, RFC 8428 CBOR labels:
#: -2 bn, 0 n, 1 u, 2 v, 6 t), so that the two files differ in keys and draws only.
SENML: Final = [{-2: "urn:dev:mgp1-vector:", 0: "temperature", 1: "Cel", 2: 21.5, 6: 0}]
#: The ``iid`` the store gives the one instruction of the vectors, the ``skey``.
_SKEY_IID: Final = 1

#: RSA-2048 test keys (PKCS#8 DER), generated once with ``cryptography``: the
#: server key, the server key the ``skey`` step announces, and the module's
#: keys ``kid`` 1 and 2.  Test keys, public: never use them for anything else.
_RSA_TEST_KEYS: Final = {
    "server": (
        "308204bd020100300d06092a864886f70d0101010500048204a7308204a30201000282010100d213d61212be"
        "0fce443dc8da978d3d38fdacb5609a1ab0d57042cbfb34c18bb428f1e6927d46a9f1801333eda2e37f717b15"
        "e812119839eed690d0343ba54e2789a0669fe2111712ddfb56ba22a8f6ba873d639baef8ca9e84a09180de69"
        "917ccd701a7cafbce1daecadb375598c09930320e7b29017fd6cd4d8881cc73165b75562ba306c6dbd7e18f2"
        "bc3d7a4018c7f5055a1cc546080f2acf1f49b2763d2e959ba669db2bce46580b5f7cac74f31c681f5587bc4a"
        "ac2e70825975207e9262a3435985191b1c3c63695ecad0f845833e9a7c352208bdfedfc6d8dbed392cb24ad7"
        "d0175904de6ecb3b6dd5863824ce88eb3e2761d0bc8ef5e57510e5a90fb90203010001028201000cdf8a4eb1"
        "3754609f6de9d0fb587c57f1b393a9c7c7baee5962be7d364e65f134511e7ffb8d48fcb38c79b226392aa619"
        "94ce13cd6036ac9c1963a8cfbee17b2ac3d98612a459759e84b85bcfa3eafaa32eefdbaa6d347d624334a760"
        "f9b7209eb62fe9541b8efb8b655989e762dd7354cdbf6501cf768824c2e0146360738b1bfbb16d592e31c4e3"
        "68f5d38a4eed7085c9c9d9fb9f7d311dbb92c8142238617d58ace25279e26a08ffe550295673124d8b3c8014"
        "437174e3d45f43f1fb8cc5c0165f5cb6a8cb025c01ef862242a5f6e1bbd55a90c0e415cb71e71f37944d6ab9"
        "dc5faa7cae7254df7654fa4369d320aaeceb114308d3dff298a7c139ff130102818100fbce1379898bf21e6c"
        "1d0980764790344ec2301455d4ffb5d8d95f0bc7b19342e4d7da30c9dda73802bc5c05bac26b91381903efeb"
        "6e44deff6e364215ecdc2f1b09b788434f03e149f070a9076e52c8ce08483a870f4cc772c3a438ad5169def4"
        "629dcbb47e9e481b14fb0e0cc7c7a27e3ae4935a0e3867eeb87049c0bcfaa502818100d593cbe006dd044af2"
        "53945d226940328d2082868e748ce664879117bd3c3773fea6967c6c51eba697fd8707dbdb8e200e86303bf9"
        "6ee84f1ad0a01e9035ff8d7c3bb52b5e1d95185b7e508cc3e12313b3b677e7db84dce6e1d00bc4fd62da587b"
        "be060066c27d227e7ad19805ed65aeb73593d4680254ad3eb91b9b2d0ff88502818042d6acacb22a0796b3b3"
        "f175bbefbb0367747c36a9a1e44e6cc5264986344896951006c6b48eb57854a192fba25b411a46fdbce1ce68"
        "72b78eadbe9144289f3991bfbe8bd8f1fc61acb2b9f4e41810b96497263502ecb8c0a861ee116d5012fe2f78"
        "8dd228930388b847956c61501659b79002646a9f23b1d2d7fa565966d05102818050c8cfa3d454c32bea0f0d"
        "1e5146c85e969d066208fe32d16e930ca1931574d02e312ad8b34c253b6560233428c81a312bed3bcf63a0bc"
        "c4371b54855afce1c5cd88f4150c4b5a3ad558a8f5259e41db50eda2db13606501fbc5eabdbf2e25f2b41383"
        "47a196cd283ff90ad05ae599c1855101b2a508c4a8a701f35c35a645d502818100ee1b9424eaca6331e02d38"
        "8e4476e9233ded149c076a3af9d787dcb8fd8a885f48e14868e152a4cea18476c02c3401cf74475208e89ec0"
        "d94b89ed49b2fbc5953b7a9c4963242bee123b4ee38cb766bcf8e7b8612a21ad4e4a5705adae4f9166f75e55"
        "1f43b97061665c7a702035b786eaba33333a604fca93a856436ed9bf8a"
    ),
    "announced": (
        "308204bc020100300d06092a864886f70d0101010500048204a6308204a20201000282010100a3e67dfd1edb"
        "75469cc5bfe523bf8fdb761465e4e467b11e7e4c06357cd232ac5dfd2be57a7687b108e206f7a0502413c8ff"
        "8e24bd7feb697be51d50db30645b89217a208a537e5ac2323c91755abafa6cfd8cdec84f049089bbbedd84f0"
        "7cf3c03cebf8e6ad7846c833dc9df6ffb2174e25af6ef176e6e0bffb87796f0bf3cc0fa86526e080552565b5"
        "729cc994f7f8042f23e6e2067fc9fbf85e3c3672b7b9d2fe2e47f45dbc305afd99406727e7aefa60ddd2877c"
        "c9f2a4bfc3d53b869aba2689d6482033a3629069e73d115190ae13e8808a3ba1484a7b0672f804960f4d99fd"
        "853ed0a3f554f665045bcd01e5a3a64e93175eaa577b548ce5cf3ca50c330203010001028201000ce790f3e5"
        "021271c4d62d0db58ad7a0c7e343428a593fb0cef0dd6c48afa41dbe28b8d410985486b3d45808172f3827f6"
        "a36865ac25ee3b17ee2a28bb994bcd8936818f1e550495d0c473d060150cb3baf11bae4ec729ecd76b58d3c8"
        "2bc72ac9f002044ee5499b09184c3e83bc0e21979d8ffa8438806521b8842a237c256dc36b7e9c780802eca1"
        "5324352cd58a9bf6c690fbe5da725be6c0fb601ab2d41242aefae5b54df26f6c89aa4a264f80a71d69f75e76"
        "6149f3131093f0bf5f41f2fbde0dfee4c0efec1d3e12e6fcbbe24907876c106ce5d7112d5faa2e1c85d99aeb"
        "392a4a6ae483a28302f327f4e5d731615f2d7894582a4640f48a3e18f7b68102818100cfc06df28d0fb69596"
        "828c2e74380fc76c2e9c3000d71b84ed1a0756ccade25123e8eabc0a91c0fad29e87829c6e8be704fc005ef0"
        "08611ed4eafac1e95a7d2f2601e311e135deda44ddd9a9f78149f6b77a2bca00416714fc924906f8bcbc9d15"
        "259e405429192ab2a18975e23d43701dcb0bfd91cc0793017c50ec09706cbb02818100c9f6f2718409476919"
        "6e29182795b0f2363d4484225bd577ce541ce51c9ffba7da489578da22ea45db44ee9ffea2c964d465d185f5"
        "edd823bc994cc7beec2629debe3b99559f78795a854c6e350ea358cf1cc9d7ff875f78bf1b47d1c16ea665a9"
        "8d689a35e28616170a38132930c8bd3ab1a01e137ac24afdfd5f2cdd2fe2e902818011b52329f3600d7dfe90"
        "2e069f9d4faafdcb93407c31d984a0f900fb2303073147504901b21cee47f2bfd4690b9058985e52646db323"
        "e3b34f0ea044faf0dd8eb13ca3f018341144a56e0b6973512fceb9a0ce2eaf8ae390645ecb9eae80d7cac3cc"
        "ab0a6ca1fc2529889f40cf01cdc7b6a261e9410e14ef30c739d6848f72950281803eb0d7eae2985ac145f28a"
        "f1038094af6aa4b3faec0b6384cfd80e2c142998dd2e85af58172615605fc2d2eb790820c99aa08c5c2fcd87"
        "74f85b0199532b4c615cd1e20023b2df9b93bca2cfe6ca476c0ec619e5615d2d067713c9c4536dbc5afc3977"
        "c9be863526f039ecd40dca25d58f3d89bd2c40c3c4b1788fad866f11d90281803d2a0d528ec23053d069caec"
        "839c6453bd6f23cb16cc0ea313f9d987df2054658ee1e757c259fd2a7a70fd40c2deaddaf5cc9dde54d05f5e"
        "4c59908efe771d2689f9b888dd0ced579c25dbe2c2c7eaa0e24ca526c3008ab94d02216f3772804d1d013aa6"
        "b7b15419fac5197b6ef149878865fabb828b92c0aaf9166003098830"
    ),
    "module-1": (
        "308204be020100300d06092a864886f70d0101010500048204a8308204a40201000282010100bc0a216516a4"
        "fe95ddbe85cfc75508fa95f71b7694c2aed16801d705a22e53815a0568a706aa32d9e04202ff022dd52e33c5"
        "50e09ea0373409d4cda39b814b3096094fdc9624a7707f2e70746ec2ae6cab166c4926b16a13908035405269"
        "3f12fcbf7ed033835300d3dd1098c6fc11d0c922e7178a16dfbaef592b401661bd2544b4fbfd50a946df519d"
        "ba6518ff5b406480c8c205963bb30646eef053c11464b49a47d3ef7e06aec4c747c40c61060d7846723bfa52"
        "d0590dbc1ebb98f23dc996e8bbad399f5a4e58a570a452976ec9be01ce2dd2d0e3d397372c60eb0604044b97"
        "40ca88160fafd86ac38057133223fb25d7a365ff7d35fb0fac20b2ca0149020301000102820100298e079142"
        "6ed600228fdf1c6acda4fd53b4d731de7023980d6712b0a105a1d89d1f42e05e7db05d2bcd0ac27625d0cdb4"
        "0d2ff163bcbe5656b1db7c037a90363d81f34f29331279aef1815289c3a62e47a4ddeb508cb6877a508af41b"
        "023d3921f7e3bb7916d57a02580139f207749c7246af51296822ab3a07b7a22310186f49db2357ea153ddc20"
        "b01d2088f54150b928903da1c06f37ed2990cada9f8b5294ec411a28a1f4ed09699a517b9eb603516e521c57"
        "88c66fd55a7d23e8db97fc62a14f213d6d0f36184b1aab36a932ec12a0f1c4fc3b6099609fed8eb247a282a8"
        "613c55050b099ae9581957ebc044c5f4b09379076b7c430d4677f76b194e8d02818100e89b3569b2bb197ea1"
        "5434358386093dc46f6b9d5ebe8420cd3cff3fa56c716fc5d046d95c66cd202f8280c8697071f93335974c78"
        "e91f7f78f897d1496bf78f8c21eed41de0f7e9eb636b6ed451728bddddfb74dfcbaecac4dcd662d6908654ba"
        "7e48fd3a9e2573f073d40d5a62a15fb264e64c5529a7f22f80dacbabc31c5b02818100cef37c75ee7a07ab21"
        "3b5e796ea94e3a5dddd4e0511d0658a54b83c0f400800ff472c152132f970b7e1e9ea9a8220f4c1e265ff867"
        "1bead9f94362be4c35d1002484a0397329d3296a6d1d66d223621eea52298c362a271c354c11783dac5c5383"
        "3dd3caa98a88ae7ff59d7c5600ae5a2ae84951ec899ec7393ecb6e2dd91a2b0281810087c6a99c043f60b761"
        "1694cf33f1d68d1e8fe76259fe9d83c429b9d8fe07da0363959af5a01145e566b627d4546fd5a7a033c51857"
        "6fc4fa14b40f72940818decaeeb7c94b9399430b2ae278342942d2cff496a677481ec4afbb34cd46efdfe9af"
        "5eadde5b0c1b529ce60fbea7a6f109ba495980ef293ca68b020d355c12ad0702818037ee3644e91eb1d3de37"
        "5d6114374d9d18a14b571494f392219a37117ee063bbec24d77a8714e58d859860e919379b4ac71b37f4ba69"
        "211fa7ee3e518fe73b84fe5999b3ed1bf0a5d0cd8c94ad5642be78359c64f87e8bf363b41b4493e6714d60ba"
        "e4f270bfb010f924385bd2227cfc817c25d4ae48c350b477f422e2e139e1028181008249a7eaa1916150f829"
        "fc17e7a7c63cde315643653f30a347a41093725a11b0a375cd81e1e86f6a7f059231952d23bf610a20ce8d9a"
        "d4d4cc3807bd1d0994de677f6bb9bdc89241492f92ea6826c577ed936e348593134724ba412d9f902b9c83bb"
        "8d105c0d8937c7a36281f49b7b6a8fd3c527028dd03a558b05ed84c49cb1"
    ),
    "module-2": (
        "308204bc020100300d06092a864886f70d0101010500048204a6308204a20201000282010100b7f48aebfa71"
        "26c57cbb31c780fa3527eea54c3a8bea65afd1b85c9a098d25216543eb1819b47ca2c67954e2b24133dc0bfd"
        "2c13cee1522f4c4d9c8bd0cfa4d25e1de4e2520d40bc024269713d2c3f9169434d82a5628e405a9869dd4e66"
        "3ebd9b1c037d77328a70d9857b3643daf76add3a1f40efa7f2711671b064cb23504a89c4cbe804ea97b218af"
        "b78850ef030cb222067a74c7e26599eedd17f677b97ee022c8e5b3780a937a9c4eafbfc32451ba61502f62b4"
        "bc61770853bb2c7e98dabb1669ef271633eddccc01856d9c7c76f933966eb1dc1c954e3f08462499083a9142"
        "0cdb77a4360e375987e26a157953c4cec6d75714d081c5e54ddc5fe6c48702030100010282010017d2745720"
        "e49c57c0d2611cebe7fb1043c86639c2bac51662bb544aa26803e1f2423c64af977ef879696703c07fcf1e74"
        "f3014d43624c8951814f7f8fb804293604fb0a10042558f395f41fb50350ec1ccc99720cc6d9931de854f552"
        "dccccd33140aa3a9d702b4a086b7b10c5283edf3de3e03e3c545113e0dd50108897731273eca143e0e68e457"
        "a97a96f5dcfdba9a9b90f2b18b90a2f0000056ede33c223289da8257f85e36e39580c918168f754fd63710e1"
        "ae3c9af07d913d89f1db13312cd16af095083c3c47df187304a6ea0148401f192a4834fd90d15d50b7501c03"
        "596362cad48099714f3dcddb4f25fa7752ba5f36bd8b13de7ca8948ec6854902818100f700c87cb932a274f6"
        "41e66ad2dd84cc5b1d14db74ab92cedbc0523654c526b140226ac7e2988ce4ab17cd0eafe4b93f24ac5c6582"
        "879e1a4c3de9cfbadd70b929a96a987d4c398b36d2723b52b038d81a6ea852138f07322db816f851f8f5a81c"
        "03602e1305593c4b6c900a6e81c968827912cc61d328e5e5d6bae89c4de67302818100bea7dc5b27712a4632"
        "738a56754ac95758403aa3c816b1e858cd9db4a68c8949e127567aa543cf638724930bb994a6bd8b508a3e1a"
        "b8776061953e3d45ca26141b83e76d0b75cbe51753bcf2a07474a5a6afe4cf9248d1b8bd1cf2fd39032a73b5"
        "0f2cafdc26962d97912d23df126d3d0ddfc5a9034a3a0aa65673c957d1d09d0281801ba9eeca69438e8662fe"
        "467c3859af01e442818f82a5a4af9e550fe01de666cafb4fdf7dbb9732507a0914624cb8e536793904b029ca"
        "5e9ebb6343c88c3938e2c413c1688abffac1e8c5f11d4bc988d44b4191807fc8491a099cd095c73886eae918"
        "47b16157fc0290bffbf1ef2682143e68a8fe53067f522047c86f3cf24c990281804c21090b58f78612dba869"
        "2fd6cc13138e88af21a10ef6e1393c79619e3375ca8b5e42d8dc4ef46be095c925a067ec20b995626e240b4e"
        "97acbf8447c12b5403296d852674b207c5a587e965d48e4bd9ad7284e2219e7427d953caef3429c074cd728e"
        "bc7622ee4aac3feb0f6cce95d2104d2f472aaa23fd06a874b98c189abd02818021c2089946c2fde374b1f340"
        "ccee12c272e5699dd43209578ac2a94cf88c3599ad5d59e0214019182e96db0d4e5016f26c703b990eb5209d"
        "0aaf1ee3b5efd26b78dd8001e430d0b9904e9a9248302a0682d703f6427ee87dda07f80d5ebdbdb77f92b6cf"
        "bdee05eec150822b2c103318afbdf11b0ab2b66a3ca777edbc21cb95"
    ),
}

#: The gateway policy of the vectors (MGP/1's defaults, pinned here so that a
#: change of m2mgw's defaults does not silently change the vectors).
POLICY: Final = ProtocolPolicy(
    sid_bytes=6,
    session_lifetime=86400,
    sign_replies=True,
    aliases=True,
    time_in_data_reply=False,
)
#: RSA-PSS salt draws are named ``pss_salt_<use>`` (auth, proof, pop, reply, skey).
_PSS_SALT: Final = "pss_salt"

T = TypeVar("T")


class VectorError(M2MGWError):
    """
    The real exchange disagreed with a recomputed value, or drew other random
    values than the generator expected: the vectors are not written.
    """


def _check(condition: bool, what: str) -> None:
    """:raise VectorError: ``condition`` is false; ``what`` says what was checked."""
    if not condition:
        raise VectorError(f"test vector generation: {what}")


def _of_type(value: object, kind: type[T], what: str) -> T:
    """:raise VectorError: ``value`` is not a ``kind``; ``what`` names it."""
    if not isinstance(value, kind):
        raise VectorError(f"test vector generation: {what} is not a {kind.__name__}")
    return value


def derive(label: str, size: int) -> bytes:
    """
    ``HKDF-SHA-256(salt = SALT, ikm = SEED, info = label, L = size)``: the
    fixed bytes named ``label`` (``"p256/hello_psk/module/tok"``).
    """
    return hkdf("SHA-256", SALT, SEED, label.encode("utf-8"), size)


def _fired(deferred: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has already fired (the memory store and,
    on top of it, the module controller answer synchronously).

    :raise VectorError: it has not fired.
    """
    box: list[Any] = []
    deferred.addBoth(box.append)
    _check(bool(box), "a Deferred of the memory store did not fire at once")
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


class NamedDraws:
    """
    A random source whose draws are named before they are made.

    :meth:`expect` names the next draws of a step; each call then returns
    :func:`derive` of ``"{suite}/{step}/{side}/{name}"`` at the size asked
    for, and records it under its name, in the order drawn.  :meth:`take`
    returns the step's record and checks that every named draw was made.

    :param prefix: ``"{suite}"``, the first part of every label.
    :param side: ``"module"`` or ``"gateway"``.
    """

    def __init__(self, prefix: str, side: str) -> None:
        self._prefix = prefix
        self._side = side
        self._step = ""
        self._names: list[str] = []
        self._drawn: dict[str, bytes] = {}

    def expect(self, step: str, *names: str) -> None:
        """
        Name the next draws, made during ``step``.

        :raise VectorError: the draws of the previous step were not taken.
        """
        _check(not self._names and not self._drawn, f"{self._step}: draws were not taken")
        self._step = step
        self._names = list(names)

    def __call__(self, n: int) -> bytes:
        """
        The next named draw, ``n`` bytes.

        :raise VectorError: no draw was expected, or a name is drawn twice.
        """
        _check(
            bool(self._names),
            f"{self._prefix}/{self._step}: unexpected {self._side} draw of {n} bytes",
        )
        name = self._names.pop(0)
        _check(name not in self._drawn, f"{self._step}: {name} drawn twice")
        value = derive(f"{self._prefix}/{self._step}/{self._side}/{name}", n)
        self._drawn[name] = value
        return value

    def take(self) -> dict[str, bytes]:
        """
        The draws of the step, by name, in the order drawn.

        :raise VectorError: some expected draws were not made.
        """
        _check(
            not self._names,
            f"{self._prefix}/{self._step}: {self._side} draws {self._names} were not made",
        )
        drawn, self._drawn = self._drawn, {}
        return drawn


def _hex(drawn: dict[str, bytes]) -> dict[str, str]:
    return {name: value.hex() for name, value in drawn.items()}


@dataclass(frozen=True)
class _ServerKey:
    """A server key pair of the vectors, as the controller wants it and as the file shows it."""

    skid: int
    suite: str
    key: Any = field(repr=False)
    public: bytes
    sig_public: bytes | None
    agreement_private: bytes = field(repr=False)
    signature_private: bytes = field(repr=False)

    @property
    def verify_key(self) -> bytes:
        """The public key that checks this server key's signatures."""
        return self.sig_public if self.sig_public is not None else self.public

    def module_view(self) -> ServerPublicKey:
        """What a module is provisioned with."""
        return ServerPublicKey(self.skid, self.suite, self.public, self.sig_public)

    def fields(self) -> dict[str, str]:
        """The ``server_*`` fields of the file."""
        return {
            "server_agreement_private": self.agreement_private.hex(),
            "server_signature_private": self.signature_private.hex(),
            "server_agreement_public": self.public.hex(),
            "server_signature_public": self.verify_key.hex(),
        }


def _server_key(suite: ICipherSuite, skid: int, role: str) -> _ServerKey:
    """The server key pair ``skid`` of ``suite``: derived, or for ``rsa`` embedded."""
    label = f"{suite.name}/server/{skid}"
    if suite.name == "rsa":
        agreement_der = signature_der = bytes.fromhex(_RSA_TEST_KEYS[role])
        key = suite.load_server_key(agreement_der)
    elif suite.name == "x25519":
        agreement = x25519.X25519PrivateKey.from_private_bytes(derive(f"{label}/agreement", 32))
        signature = ed25519.Ed25519PrivateKey.from_private_bytes(derive(f"{label}/signature", 32))
        agreement_der, signature_der = pkcs8_der(agreement), pkcs8_der(signature)
        key = suite.load_server_key(pkcs8_pem(agreement) + pkcs8_pem(signature))
    else:
        # One EC pair does both; derived as the suite derives any key from a draw.
        private = suite.generate_signing_key(lambda n: derive(label, n))
        agreement_der = signature_der = bytes(suite.dump_signing_key(private))
        key = suite.load_server_key(agreement_der)
    public, sig_public = suite.server_public(key)
    return _ServerKey(
        skid, suite.name, key, bytes(public), sig_public, agreement_der, signature_der
    )


class _SuiteRun:
    """
    One suite's vectors: a module endpoint and a gateway on a memory store,
    played through every step in order, each step recorded and checked.
    """

    def __init__(self, suite_name: str) -> None:
        suite: ICipherSuite = lookup(ICipherSuite, suite_name)
        self.suite = suite
        self.name = suite_name
        self.is_rsa = suite_name == "rsa"
        self.skid = SUITE_SKIDS[suite_name]
        self.psk = derive(f"{suite_name}/psk", 32)
        self.server = _server_key(suite, self.skid, "server")
        self.announced = _server_key(suite, self.skid + ANNOUNCED_SKID_OFFSET, "announced")
        self.module_random = NamedDraws(suite_name, "module")
        self.gateway_random = NamedDraws(suite_name, "gateway")
        #: The module's private keys by ``kid``, as registered.
        self.module_keys: dict[int, Any] = {}
        #: The session keys by ``sid``, recomputed and checked at each HELLO.
        self.sessions: dict[bytes, keyschedule.SessionKeys] = {}
        self._rsa_module_keys = [_RSA_TEST_KEYS["module-1"], _RSA_TEST_KEYS["module-2"]]

        state = ModuleState(
            identity=IDENTITY,
            suite=suite_name,
            psk=self.psk,
            server_keys={self.skid: self.server.module_view()},
            skid=self.skid,
            require_server_signature=True,
        )
        self.endpoint = ModuleEndpoint(
            state,
            random=self.module_random,
            clock=lambda: float(CLOCK),
            key_factory=self._key_factory,
        )
        self.store = MemoryStore()
        _fired(self.store.open())
        _fired(self.store.add_modules([Module(IDENTITY, psk=self.psk)]))
        self.controller = ModuleController(
            self.store,
            {suite_name: suite},
            [self.server, self.announced],
            POLICY,
            now=lambda: float(CLOCK),
            random=self.gateway_random,
        )

    # -- helpers ------------------------------------------------------------------------------

    def _key_factory(self, suite: ICipherSuite, random: RandomSource) -> Any:
        """
        New module keys: the suite's own derivation from one draw, or for
        ``rsa`` the next embedded key, after the 32-byte draw the ``rsa``
        suite makes (and discards) when it generates a key.
        """
        if suite.name != "rsa":
            return suite.generate_signing_key(random)
        random(KEY_MATERIAL_BYTES)
        return suite.load_signing_key(bytes.fromhex(self._rsa_module_keys.pop(0)))

    def _server_for(self, skid: int) -> _ServerKey:
        for server in (self.server, self.announced):
            if server.skid == skid:
                return server
        raise VectorError(f"no server key {skid}")

    def _salt(self, drawn: dict[str, bytes], use: str) -> ScriptedRandom | None:
        """The recorded salt ``pss_salt_<use>`` as a one-draw source (``rsa``), else ``None``."""
        if not self.is_rsa:
            return None
        return ScriptedRandom([drawn[f"{_PSS_SALT}_{use}"]])

    def _check_signature(
        self,
        key: Any,
        public: bytes,
        sig: bytes,
        data: bytes,
        drawn: dict[str, bytes],
        use: str,
        what: str,
    ) -> None:
        """``sig`` verifies, and signing again (with the recorded salt) gives it."""
        self.suite.verify(public, sig, data)
        _check(self.suite.sign(key, data, self._salt(drawn, use)) == sig, f"{what} differs")

    def _hello_draws(self, method: AuthMethod) -> list[str]:
        names = ["z_es", "oaep_seed", "tok"] if self.is_rsa else ["ephemeral", "tok"]
        if self.is_rsa and method == AuthMethod.SIG:
            names.append(f"{_PSS_SALT}_auth")
        return names

    def _key_draws(self, vouched_by_key: bool) -> list[str]:
        names = ["key_material"]
        if self.is_rsa:
            names += [f"{_PSS_SALT}_proof"] if vouched_by_key else []
            names.append(f"{_PSS_SALT}_pop")
        return names

    def _gateway(self, datagram: bytes) -> bytes:
        reply = _fired(self.controller.handle(datagram, ("192.0.2.1", 5740)))
        drops = self.controller.drops.by_reason
        _check(isinstance(reply, bytes), f"the gateway dropped a datagram: {drops}")
        return bytes(reply)

    @staticmethod
    def _accepted(outcome: ReplyOutcome, step: str) -> ReplyOutcome:
        _check(outcome.accepted, f"{step}: the module dropped the reply: {outcome.reason}")
        return outcome

    # -- HELLO ---------------------------------------------------------------------------------

    def hello(
        self,
        step: str,
        method: AuthMethod,
        build: Callable[[], Outgoing],
        *,
        key_draws: Sequence[str] = (),
    ) -> tuple[dict[str, Any], ReplyOutcome]:
        """
        Build a HELLO with ``build``, have the gateway answer it, have the
        module accept the answer, and record and check every value.

        :param key_draws: the draws ``build`` makes for a key registration first.
        """
        self.module_random.expect(step, *key_draws, *self._hello_draws(method))
        outgoing = build()
        module_drawn = self.module_random.take()
        gateway_names = ["sid", "stok", "alias"] + ([f"{_PSS_SALT}_reply"] if self.is_rsa else [])
        self.gateway_random.expect(step, *gateway_names)
        reply = self._gateway(outgoing.datagram)
        gateway_drawn = self.gateway_random.take()
        record = self._hello_record(step, outgoing, module_drawn)
        _check(record["method"] == method, f"{step}: authenticated with method {record['method']}")
        context = _of_type(outgoing.context, HelloContext, f"{step}: the context")
        outcome = self._accepted(self.endpoint.handle_hello_reply(reply, context), step)
        record.update(self._reply_record(step, outgoing, reply, module_drawn, gateway_drawn))
        return record, outcome

    def _hello_record(
        self, step: str, outgoing: Outgoing, drawn: dict[str, bytes]
    ) -> dict[str, Any]:
        suite = self.suite
        context = _of_type(outgoing.context, HelloContext, f"{step}: the context")
        hello = _of_type(parse_request(outgoing.datagram), Hello, f"{step}: the datagram")
        server = self._server_for(hello.skid)
        epk, z_es = hello.epk, context.z_es

        # Z_es on both sides, and the module's draws give epk again.
        _check(suite.agree(server.key, epk) == z_es, f"{step}: the gateway's Z_es differs")
        draws = [drawn["z_es"], drawn["oaep_seed"]] if self.is_rsa else [drawn["ephemeral"]]
        again = suite.encapsulate(server.public, ScriptedRandom(draws))
        _check(again == (epk, z_es), f"{step}: the recorded draws do not give epk and Z_es")

        keys = keyschedule.hello_keys(suite, z_es)
        _check(keys.k_hreply == context.k_hreply, f"{step}: k_hreply differs")
        aad = hello.aad
        _check(aad == context.hello_aad, f"{step}: the HELLO AAD differs")
        plaintext = suite.open(keys.k_hello, keyschedule.zero_nonce(suite), aad, hello.ct)
        parsed = parse_hello_plaintext(plaintext)
        body = parsed.body
        _check(body.id == IDENTITY and body.tok == drawn["tok"], f"{step}: id or tok differs")
        tbs = keyschedule.hello_auth_tbs(aad, parsed.body_bytes)

        record: dict[str, Any] = {
            "module_random": _hex(drawn),
            "epk": epk.hex(),
            "z_es": z_es.hex(),
            "prk_hello": keys.prk.hex(),
            "k_hello": keys.k_hello.hex(),
            "k_hreply": keys.k_hreply.hex(),
            "aad": aad.hex(),
            "body": parsed.body_bytes.hex(),
            "tbs": tbs.hex(),
            "method": int(parsed.method),
            "auth_value": parsed.value.hex(),
            "plaintext": plaintext.hex(),
            "datagram": outgoing.datagram.hex(),
        }
        if "ephemeral" in drawn:
            record["ephemeral_private"] = self._ephemeral_private(drawn["ephemeral"], epk, z_es)

        if parsed.method == AuthMethod.PSK:
            _check(keyschedule.psk_mac(self.psk, epk, tbs) == parsed.value, f"{step}: PSK MAC")
            record["k_psk"] = keyschedule.psk_key(self.psk, epk).hex()
        elif parsed.method == AuthMethod.SIG:
            key = self.module_keys[body.kid]
            public = suite.signing_public(key)
            self._check_signature(key, public, parsed.value, tbs, drawn, "auth", f"{step}: auth")
        else:
            key = self.module_keys[body.kid]
            z_ss = suite.static_agree(server.key, suite.signing_public(key))
            _check(suite.static_agree(key, server.public) == z_ss, f"{step}: the module's Z_ss")
            _check(keyschedule.sdh_mac(suite, z_ss, epk, tbs) == parsed.value, f"{step}: SDH MAC")
            record["z_ss"] = z_ss.hex()
            record["k_sdh"] = keyschedule.sdh_key(suite, z_ss, epk).hex()
        return record

    def _ephemeral_private(self, material: bytes, epk: bytes, z_es: bytes) -> str:
        """The ephemeral private key the draw gives (EC: ``d``, X25519: the raw key)."""
        if self.name == "x25519":
            private = x25519.X25519PrivateKey.from_private_bytes(material)
            _check(
                private.public_key().public_bytes_raw() == epk, "the X25519 ephemeral key differs"
            )
            return material.hex()
        ephemeral = self.suite.generate_signing_key(ScriptedRandom([material]))
        _check(isinstance(ephemeral, EllipticCurvePrivateKey), "not an EC ephemeral key")
        _check(self.suite.signing_public(ephemeral) == epk, "the EC ephemeral key differs")
        d: int = ephemeral.private_numbers().private_value
        return d.to_bytes(len(z_es), "big").hex()

    def _reply_record(
        self,
        step: str,
        outgoing: Outgoing,
        reply: bytes,
        module_drawn: dict[str, bytes],
        gateway_drawn: dict[str, bytes],
    ) -> dict[str, Any]:
        suite = self.suite
        context = _of_type(outgoing.context, HelloContext, f"{step}: the context")
        server = self._server_for(context.skid)
        message = _of_type(parse_reply(reply), HelloReply, f"{step}: the reply")
        reply_aad = message.aad
        reply_plaintext = suite.open(
            context.k_hreply, keyschedule.zero_nonce(suite), reply_aad, message.ct
        )
        parsed = parse_hello_reply_plaintext(reply_plaintext)
        body = parsed.body
        sig = _of_type(parsed.sig, bytes, f"{step}: the reply's signature")
        reply_tbs = keyschedule.reply_tbs(context.hello_aad, reply_aad, parsed.body_bytes)
        self._check_signature(
            server.key, server.verify_key, sig, reply_tbs, gateway_drawn, "reply", f"{step}: sig"
        )
        sid, stok = message.sid, _of_type(body.stok, bytes, f"{step}: stok")
        _check(
            (sid, stok, body.alias, body.ack)
            == (gateway_drawn["sid"], gateway_drawn["stok"], gateway_drawn["alias"], context.tok),
            f"{step}: sid, stok, alias or ack differ from the draws",
        )
        _check(body.time == CLOCK and body.exp == POLICY.session_lifetime, f"{step}: time, exp")

        session = keyschedule.session_keys(suite, context.z_es, stok, sid, IDENTITY, context.kid)
        module_session = self.endpoint.state.session
        gateway_session = _fired(self.store.get_session(sid))
        for holder in (module_session, gateway_session):
            _check(
                holder is not None
                and (holder.sid, holder.k_up, holder.k_down) == (sid, session.k_up, session.k_down),
                f"{step}: the session keys of an endpoint differ",
            )
        self.sessions[sid] = session
        return {
            "gateway_random": _hex(gateway_drawn),
            "reply_aad": reply_aad.hex(),
            "reply_body": parsed.body_bytes.hex(),
            "reply_tbs": reply_tbs.hex(),
            "sig": sig.hex(),
            "reply_plaintext": reply_plaintext.hex(),
            "reply": reply.hex(),
            "sid": sid.hex(),
            "stok": stok.hex(),
            "prk_s": session.prk_s.hex(),
            "session_info": keyschedule.session_info(sid, IDENTITY, context.kid).hex(),
            "k_up": session.k_up.hex(),
            "k_down": session.k_down.hex(),
        }

    # -- DATA ----------------------------------------------------------------------------------

    def data(
        self,
        step: str,
        payload: Payload | None,
        *,
        before: Callable[[], object] | None = None,
        module_draws: Sequence[str] = (),
        gateway_draws: Sequence[str] = (),
    ) -> tuple[dict[str, Any], ReplyOutcome]:
        """
        Build a DATA carrying ``payload`` (after ``before``, which makes
        ``module_draws``), have the gateway answer it and the module accept
        the answer; record and check every value.
        """
        suite = self.suite
        self.module_random.expect(step, *module_draws, "tok")
        if before is not None:
            before()
        outgoing = self.endpoint.build_data(payload)
        module_drawn = self.module_random.take()
        outbox = _of_type(self.endpoint.state.outbox, Outbox, f"{step}: the outbox")
        self.gateway_random.expect(step, *gateway_draws)
        reply = self._gateway(outgoing.datagram)
        gateway_drawn = self.gateway_random.take()
        outcome = self._accepted(self.endpoint.handle_data_reply(reply), step)

        data = _of_type(parse_request(outgoing.datagram), Data, f"{step}: the datagram")
        session = self.sessions[data.sid]
        nonce = keyschedule.nonce_for_ctr(suite, data.ctr)
        body = suite.open(session.k_up, nonce, data.aad, data.ct)
        _check(body == outbox.body, f"{step}: the DataBody differs")
        _check(parse_data_body(body).tok == module_drawn["tok"], f"{step}: tok differs")
        answer = _of_type(parse_reply(reply), DataReply, f"{step}: the reply")
        _check((answer.sid, answer.ctr) == (data.sid, data.ctr), f"{step}: another DATA's reply")
        reply_body = suite.open(session.k_down, nonce, answer.aad, answer.ct)
        _check(parse_reply_body(reply_body).ack == module_drawn["tok"], f"{step}: ack differs")
        record: dict[str, Any] = {
            "module_random": _hex(module_drawn),
            "ctr": data.ctr,
            "nonce": nonce.hex(),
            "aad": data.aad.hex(),
            "body": body.hex(),
            "datagram": outgoing.datagram.hex(),
            "reply_body": reply_body.hex(),
            "reply": reply.hex(),
        }
        if gateway_drawn:
            record["gateway_random"] = _hex(gateway_drawn)
        return record, outcome

    # -- key registration ------------------------------------------------------------------------

    def keyreg_record(
        self,
        step: str,
        pending: PendingKeyReg,
        drawn: dict[str, bytes],
        sent: KeyReg | InvalidKeyReg | None,
    ) -> dict[str, Any]:
        """The keyreg fields of a new key, checked against the KeyReg that was sent."""
        suite = self.suite
        key = suite.load_signing_key(pending.private)
        pub = bytes(suite.signing_public(key))
        _check(pub == pending.pub, f"{step}: the new key's public key differs")
        if not self.is_rsa:
            derived = suite.generate_signing_key(ScriptedRandom([drawn["key_material"]]))
            _check(suite.signing_public(derived) == pub, f"{step}: key_material gives another key")
        _check(
            sent == pending.keyreg() and pending.pid == 0,
            f"{step}: the KeyReg sent is not the pending one",
        )
        tbs_k = keyschedule.keyreg_tbs(IDENTITY, pending.kid, pub, suite.name, pending.pid)
        record: dict[str, Any] = {
            "kid": pending.kid,
            "private": pending.private.hex(),
            "pub": pub.hex(),
            "tbs_k": tbs_k.hex(),
            "proof": pending.proof.hex(),
            "pop": pending.pop.hex(),
        }
        if pending.proof_kid == 0:
            proof = keyschedule.psk_keyreg_proof(self.psk, IDENTITY, tbs_k)
            _check(proof == pending.proof, f"{step}: the PSK proof differs")
            record["k_psk_keyreg"] = keyschedule.psk_keyreg_key(self.psk, IDENTITY).hex()
        else:
            vouching = self.module_keys[pending.proof_kid]
            self._check_signature(
                vouching,
                suite.signing_public(vouching),
                pending.proof,
                tbs_k,
                drawn,
                "proof",
                f"{step}: proof",
            )
        self._check_signature(key, pub, pending.pop, tbs_k, drawn, "pop", f"{step}: pop")
        self.module_keys[pending.kid] = key
        return record

    # -- the steps ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every step, in order, on one module and one gateway: the suite's vectors."""
        endpoint, state, suite = self.endpoint, self.endpoint.state, self.suite
        vectors: dict[str, Any] = {
            "suite": self.name,
            "identity": IDENTITY,
            "psk": self.psk.hex(),
            "skid": self.skid,
            "clock": CLOCK,
            "nonce_len": suite.nonce_len,
            **self.server.fields(),
        }

        # hello_psk: PSK HELLO with SenML in pl, the identity as hint.
        vectors["hello_psk"], _ = self.hello(
            "hello_psk", AuthMethod.PSK, lambda: endpoint.build_hello(Payload(data=SENML))
        )
        _check(state.session is not None and state.session.kid == 0, "hello_psk: no PSK session")

        # data: SenML and req "time".
        vectors["data"], outcome = self.data("data", Payload(data=SENML, req=("time",)))
        _check(outcome.body is not None and outcome.body.time == CLOCK, "data: no time")

        # keyreg: DATA with KeyReg kid 1, proof by the PSK.
        pending: list[PendingKeyReg] = []
        record, outcome = self.data(
            "keyreg",
            None,
            before=lambda: pending.append(endpoint.start_key_registration()),
            module_draws=self._key_draws(vouched_by_key=False),
        )
        sent = parse_data_body(bytes.fromhex(record["body"])).pl
        keyreg = self.keyreg_record(
            "keyreg",
            pending[0],
            {k: bytes.fromhex(v) for k, v in record["module_random"].items()},
            None if sent is None else sent.keyreg,
        )
        _check(
            outcome.keyreg is not None and outcome.keyreg.status == KeyRegStatus.ACCEPTED,
            "keyreg: not accepted",
        )
        vectors["keyreg"] = {**keyreg, **record}

        # hello_sig: SIG HELLO with the registered key 1 (the client's default), and a DATA.
        vectors["hello_sig"], _ = self.hello(
            "hello_sig", AuthMethod.SIG, lambda: endpoint.build_hello()
        )
        _check(state.keys[1].status == KeyState.ACTIVE and state.psk is None, "hello_sig: key 1")
        vectors["hello_sig"]["data"], _ = self.data("hello_sig/data", Payload(data=SENML))

        # hello_sdh (EC suites): SDH HELLO with key 1, and a DATA.
        if suite.supports_sdh:
            vectors["hello_sdh"], _ = self.hello(
                "hello_sdh", AuthMethod.SDH, lambda: endpoint.build_hello(method=AuthMethod.SDH)
            )
            vectors["hello_sdh"]["data"], _ = self.data("hello_sdh/data", Payload(data=SENML))

        # hello_keyreg: SIG HELLO with key 1 carrying KeyReg kid 2, proof by key 1.
        def register_and_hello() -> Outgoing:
            pending.append(endpoint.start_key_registration())
            return endpoint.build_hello(include_keyreg=True)

        key_draws = self._key_draws(vouched_by_key=True)
        record, outcome = self.hello(
            "hello_keyreg", AuthMethod.SIG, register_and_hello, key_draws=key_draws
        )
        sent_hello = parse_hello_plaintext(bytes.fromhex(record["plaintext"])).body.pl
        record["keyreg"] = self.keyreg_record(
            "hello_keyreg",
            pending[1],
            {k: bytes.fromhex(v) for k, v in record["module_random"].items()},
            None if sent_hello is None else sent_hello.keyreg,
        )
        _check(
            outcome.keyreg is not None and outcome.keyreg.status == KeyRegStatus.ACCEPTED,
            "hello_keyreg: not accepted",
        )
        _check(state.keys[2].status == KeyState.REGISTERED, "hello_keyreg: key 2")
        vectors["hello_keyreg"] = record

        vectors["skey"] = self._skey()

        # hello_skey: SIG HELLO with key 1 to the announced server key, confirming the skey.
        vectors["hello_skey"], _ = self.hello(
            "hello_skey", AuthMethod.SIG, lambda: endpoint.build_hello(kid=1)
        )
        hello_skey = parse_request(bytes.fromhex(vectors["hello_skey"]["datagram"]))
        _check(
            isinstance(hello_skey, Hello) and hello_skey.skid == self.announced.skid,
            "hello_skey: not addressed to the announced key",
        )
        confirmed = _fired(self.store.get_instruction(IDENTITY, _SKEY_IID))
        _check(
            confirmed.state == InstructionState.CONFIRMED and confirmed.exec_ts == CLOCK,
            "hello_skey: the skey is not confirmed",
        )
        _check(state.pending_confs == [], "hello_skey: a confirmation is still waiting")
        keys = {key.kid: key.status for key in _fired(self.store.list_keys(IDENTITY))}
        _check(keys == {1: KeyStatus.ACTIVE, 2: KeyStatus.PENDING}, f"the gateway's keys: {keys}")
        _check(self.controller.drops.total == 0, "the gateway dropped something")
        return vectors

    def _skey(self) -> dict[str, Any]:
        """skey: a DATA whose reply carries the announcement of the server key skid + 100."""
        suite, state, announced = self.suite, self.endpoint.state, self.announced
        body: dict[int, Any] = {1: announced.skid, 2: suite.name, 3: announced.public}
        if announced.sig_public is not None:
            body[4] = announced.sig_public
        sized = {**body, 5: bytes(suite.signature_len)}
        queued = _fired(
            self.store.enqueue(
                NewInstruction(
                    IDENTITY,
                    KIND_SKEY,
                    cbor.encode(body),
                    wire_size=instruction_wire_size(KIND_SKEY, sized),
                    source="gateway",
                ),
                CLOCK,
            )
        )
        _check(queued.iid == _SKEY_IID, "skey: the instruction is not iid 1")
        carrier = _of_type(state.session, ModuleSession, "skey: the session")
        record, outcome = self.data(
            "skey",
            Payload(data=SENML),
            gateway_draws=[f"{_PSS_SALT}_skey"] if self.is_rsa else [],
        )
        _check(
            [(i.iid, i.kind, i.status) for i in outcome.instructions]
            == [(_SKEY_IID, KIND_SKEY, int(ConfStatus.DONE))],
            "skey: the module did not execute the skey",
        )
        _check(
            state.server_keys.get(announced.skid) == announced.module_view()
            and state.skid == announced.skid,
            "skey: the module did not store the announced key",
        )
        _check(state.pending_confs == [ConfEntry(_SKEY_IID, 0, CLOCK)], "skey: no confirmation")

        reply_body = bytes.fromhex(record["reply_body"])
        (item,) = parse_reply_body(reply_body).ins
        skey = parse_skey_body(item.body)
        tbs = keyschedule.skey_tbs(skey.skid, skey.suite, skey.pub, skey.sig_pub)
        signer = self._server_for(carrier.skid)
        drawn = {k: bytes.fromhex(v) for k, v in record.get("gateway_random", {}).items()}
        self._check_signature(
            signer.key, signer.verify_key, skey.sig, tbs, drawn, "skey", "skey: skey_sig"
        )
        instruction = item.encode()
        _check(instruction in reply_body, "skey: the instruction is not in the reply")
        return {
            "skid": announced.skid,
            "suite": suite.name,
            **announced.fields(),
            "skey_tbs": tbs.hex(),
            "skey_sig": skey.sig.hex(),
            "instruction": instruction.hex(),
            **record,
        }


def _about() -> dict[str, str]:
    """The file's ``_about``: what it is and how it was made, in the reference's sections."""
    skids = ", ".join(f"{name} {skid}" for name, skid in SUITE_SKIDS.items())
    return {
        "what": (
            "MGP/1 test vectors made by m2mgw's own implementation with the generator "
            f"m2mgw.testvectors version {GENERATOR_VERSION} (python -m m2mgw.testvectors): "
            "the module client m2mgw.client.ModuleEndpoint built every datagram, the module "
            "controller m2mgw.protocol.engine.ModuleController (memory store) answered it and "
            "the client accepted the answer. Same JSON shape, steps and field names as "
            "docs/spec/vectors.json, the independent reference; different identity, keys, "
            "skids, clock and random draws. Every byte string is lowercase hex."
        ),
        "keys": (
            "TEST KEYS ONLY: every private key and PSK in this file is public. Never provision "
            "them on a module or a gateway. PSKs, EC, X25519 and Ed25519 keys and every random "
            "draw are HKDF-SHA-256(salt = 'm2mgw test vectors', ikm = the generator's SEED, "
            "info = a label, L = the size drawn), the labels being '<suite>/psk', "
            "'<suite>/server/<skid>' (x25519: '/agreement' and '/signature' appended) and "
            "'<suite>/<step>/<module or gateway>/<draw name>'. RSA keys "
            "cannot be derived from random bytes (MGP/1 defines no derivation): the four RSA-2048 "
            "keys (server, announced server, module kid 1 and 2) were generated once and are "
            "embedded in the generator."
        ),
        "setup": (
            f"identity, psk, skid (unique across suites: {skids}), clock (the gateway's time "
            "for every reply, the module's clock and its first HELLO ts), nonce_len (13 for "
            "p256-ccm8, else 12), server_*_private (PKCS#8 DER), server_*_public (the wire and "
            "provisioning encoding: SEC1 uncompressed point, raw 32-byte X25519/Ed25519, DER "
            "SPKI for rsa). For the EC suites and rsa the agreement and signature key pair are "
            "one pair."
        ),
        "gateway_policy": (
            "m2mgw's defaults, pinned by the generator: sign_replies on, aliases on (12 "
            "random bytes, a new one per HELLO_REPLY), sid_bytes 6, exp 86400, time in a "
            'DATA_REPLY only when asked with req "time"; one instruction: the "skey" of the '
            "skey step (iid 1), queued just before it and signed when its DATA_REPLY is "
            "built, by the key of skid (the server key of the session that carries it)."
        ),
        "randomness": (
            "module_random / gateway_random list every random draw of a step by name, in the "
            "order the implementation draws them: feed them to your random source in that "
            "order. Names: ephemeral (EC: the scalar material, d = material mod (n-1) + 1, "
            "given as ephemeral_private; x25519: the private key), z_es then oaep_seed (rsa), "
            "tok, key_material (the new module key's draw; rsa draws it too but the key is the "
            "embedded one given as private), sid, stok, alias, and one name per RSA-PSS salt "
            "after what it salts: pss_salt_auth (the HELLO's SIG auth), pss_salt_proof (a "
            "KeyReg proof signed by the previous key), pss_salt_pop (a KeyReg proof of "
            "possession), pss_salt_reply (the HELLO_REPLY signature), pss_salt_skey (the skey "
            "signature). Unlike the reference (whose rsa/hello_keyreg lists the HELLO's salt as "
            "pss_salt, the pop's as pss_salt_2 and leaves out the proof's), every draw is "
            "listed. ECDSA signatures use RFC 6979 deterministic nonces and Ed25519 is "
            "deterministic; a signer with random nonces can verify the vectors' signatures and "
            "compare everything else."
        ),
        "payloads": (
            'the reports carry the reference\'s SenML record [{-2: "urn:dev:mgp1-vector:", '
            '0: "temperature", 1: "Cel", 2: 21.5, 6: 0}]; DataBody ts is the clock.'
        ),
        "steps": (
            "hello_psk (PSK HELLO, SenML in pl), data (DATA with SenML and req time), keyreg "
            "(DATA with KeyReg kid 1, PSK proof), hello_sig (SIG HELLO kid 1, then a DATA on its "
            "session), hello_sdh (SDH HELLO kid 1, EC suites only, then a DATA), hello_keyreg "
            "(SIG HELLO kid 1 carrying KeyReg kid 2 in pl, proof signed by key 1), skey (DATA "
            "with SenML on the hello_keyreg session, whose DATA_REPLY carries the skey "
            "instruction announcing the server key skid + 100), hello_skey (SIG HELLO kid 1 for "
            "the announced skid, its pl confirming the skey with conf [1, 0, clock]; the reply "
            "is signed by the announced key), in this order on one module and one gateway. A "
            "HELLO's hint is the alias of the reply before it (the identity in hello_psk)."
        ),
        "hello_fields": (
            "epk, z_es, prk_hello, k_hello, k_hreply, aad, body (HelloBody bytes), tbs, method "
            "(1 SIG, 2 PSK, 3 SDH), auth_value, k_psk (PSK), z_ss and k_sdh (SDH), plaintext "
            "(CBOR [body, auth]), datagram"
        ),
        "reply_fields": (
            "reply_aad, reply_body (ReplyBody bytes), reply_tbs (what sig signs), sig, "
            "reply_plaintext (CBOR [body, sig]), reply (datagram), sid, stok, prk_s, "
            "session_info, k_up, k_down"
        ),
        "data_fields": (
            "ctr, nonce, aad, body (DataBody plaintext), datagram, reply_body (ReplyBody "
            "plaintext), reply"
        ),
        "keyreg_fields": (
            "kid, private (PKCS#8 DER), pub, tbs_k, k_psk_keyreg (PSK proof key), proof, pop"
        ),
        "skey_fields": (
            "announced: skid, suite, server_*_private and server_*_public of the announced key "
            'pair(s) as in setup, skey_tbs (CBOR ["MGP1 skey", skid, suite, pub, sig_pub or '
            "null]), skey_sig (by the signature key of the setup skid), instruction (the CBOR "
            'Instruction [iid, "skey", body] as it rides in the DATA_REPLY); then the '
            "data_fields of the DATA that fetched it"
        ),
        "regenerate": (
            "python -m m2mgw.testvectors writes this file; python -m m2mgw.testvectors --check "
            "compares it with a fresh run (tests/test_testvectors.py does both)."
        ),
    }


def generate(suites: Sequence[str] = tuple(SUITE_SKIDS)) -> dict[str, Any]:
    """
    Run every suite's exchange and return the vectors document.

    :param suites: the suites to include, in order (default all five).
    :raise VectorError: the exchange disagreed with a recomputed value, a
        signature did not verify or a message did not decrypt or parse.
    """
    document: dict[str, Any] = {"_about": _about()}
    for name in suites:
        try:
            document[name] = _SuiteRun(name).run()
        except VectorError:
            raise
        except M2MGWError as e:
            raise VectorError(f"test vector generation: {name}: {e}") from e
    return document


def render(document: dict[str, Any]) -> str:
    """The file's text: JSON indented by one space, as the reference, with a final newline."""
    return json.dumps(document, indent=1) + "\n"


def _first_difference(expected: Any, found: Any, path: str = "") -> str | None:
    """The path of the first value that differs between two JSON documents, if any."""
    if isinstance(expected, dict) and isinstance(found, dict):
        if list(expected) != list(found):
            return f"{path or '/'} (keys {list(found)} instead of {list(expected)})"
        for name in expected:
            where = _first_difference(expected[name], found[name], f"{path}/{name}")
            if where is not None:
                return where
        return None
    return None if expected == found else path or "/"


def main(argv: Sequence[str] | None = None) -> int:
    """
    The command line: write the vectors, or with ``--check`` compare them
    with the file.

    :return: the exit status: 0, or 1 when ``--check`` finds a difference.
    """
    parser = argparse.ArgumentParser(
        prog="python -m m2mgw.testvectors",
        description="Write (or check) m2mgw's own MGP/1 test vectors.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the vectors file (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write: exit 1 if the file differs from a fresh generation",
    )
    options = parser.parse_args(argv)
    text = render(generate())
    path: Path = options.out
    if options.check:
        try:
            existing = path.read_text(encoding="utf-8")
        except OSError as e:
            sys.stderr.write(f"{path}: cannot read: {e.strerror}\n")
            return 1
        if existing != text:
            try:
                where = _first_difference(json.loads(text), json.loads(existing))
            except ValueError:
                where = "/ (not JSON)"
            where = where or "/ (formatting only)"
            sys.stderr.write(
                f"{path} differs from a fresh generation at {where}; "
                "regenerate it with python -m m2mgw.testvectors\n"
            )
            return 1
        sys.stdout.write(f"{path} is up to date\n")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
