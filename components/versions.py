"""Release versions the program can install, with their published sha256 sums.

Every checksum below was read from kubernetes-sigs/kubespray,
roles/kubespray_defaults/vars/main/checksums.yml at commit 46dbdd3994b32640bcd806b0097f50e8fdf1d514
(2026-08-21); none was computed here. A version missing from a table cannot be configured,
so a host never runs a binary whose checksum we do not know.
"""

from typing import Final

Checksums = dict[str, dict[str, str]]  # arch -> version -> sha256

ETCD_SHA256: Final[Checksums] = {
    "amd64": {
        "3.5.33": "5025b5b24d81a9616b6e284ccd439b9a3df055ef8fdcdc142af3ec8f6a3b3c95",
        "3.5.32": "83532f9290ee89106c4c9d0467220f65623c1faadaab800d727f7beccce4d7dd",
        "3.5.31": "e76b75c73b10196dfeb1c52fcdf9f4014e51f3082f65f28fb2e69a7bec1f916b",
        "3.6.14": "ffe840ff9295808e88cce2794a18a5ac87f12a5203c8314d0bf6aa119b41bac5",
        "3.6.13": "b4928654aed84d90952620c7144555e4186d795e1e7414e65fe0cf6265fd0465",
        "3.6.12": "d2564bb50b58e52fbaf3bde4a9561a1d04e20cdc761f795580e4d615d5d41355",
    },
    "arm64": {
        "3.5.33": "0764c5c0acef155f4bfa0487791cc5776adef66315bf16ec0653883bfd463a90",
        "3.5.32": "89f3ec49bc026c77ab5862c34f0623f09b48ec75e659082c92829669c6e36b3c",
        "3.5.31": "1fc441acb75486c076db0900470b18da61ee529a5d54df7c619dfc12dd13b984",
        "3.6.14": "fa1b80565ee6fc2df1ae6f57a508b221f3ecc7d591c317c581cd8281b0842b3e",
        "3.6.13": "5ab53ff70301fa9d782fa4b59fdfc1fae49ffdf427a0afb3cd313a93449800fc",
        "3.6.12": "147afc710e164fa342ad8561bcca8903f3913bd9fb9ae0c83c857b1d868189cc",
    },
}

KUBELET_SHA256: Final[Checksums] = {
    "amd64": {
        "1.34.11": "4777a226b2ba3c1d656254bcf3f7ad471bf210042f361094216e51ab4fa9b4b6",
        "1.34.10": "59669fd1233989fda877aa8a785bd56d4c73e739afcd90596c62e0172af2738c",
        "1.35.8": "6971b9f95e54dbed67a2271abe6e78f8cc2894494649f3cf39e4b25a82dca923",
        "1.35.7": "e48cbb9c62351aa95f455bdae3c9a9e9d7d644027c231ade7a67b868b2be3258",
        "1.36.4": "cf2562db46c48ab84cc3791540778ee7fb1a0a008529adbb434723dd02ed8b4b",
        "1.36.3": "46707a53209f826ad0f0d62371ac69cd00e78fd9a8176cf5f6f87f18f7f8b718",
    },
    "arm64": {
        "1.34.11": "f12879879481e9af46317c2c82a6dba7d59df78ed095e44e0399643df1c4c8ba",
        "1.34.10": "8f9305c7c639056e9544af4d360119af03c43cec470b2fb28ddaca26525b2564",
        "1.35.8": "7744f84c49df6dff7d0a0471f9acef31568c02459659de83aa279cf3a04b1714",
        "1.35.7": "0dc3f53fc51f6a6c26c437ec9eded016106ef931db2dd9b3905c656796bed438",
        "1.36.4": "fd53ea3fcbd077844f50a3c67e9b52f62972a563674956bab0c0f4fb7ea37d50",
        "1.36.3": "57205a5daf5883873d87b4914e1e00bdd7707acd075714788cfb0fc1f60bc414",
    },
}

KUBECTL_SHA256: Final[Checksums] = {
    "amd64": {
        "1.34.11": "8efbb9435132a190920eb65a47a8c1ecf755ad85ab57a600c9bedbab460bb7a8",
        "1.34.10": "95bd70842bd11a524d24acd5b68726899e3488e153e45e2b4ae846545beda050",
        "1.35.8": "874d5e72dbb819f43cff16bcd1e4f8bac5b7f2361fe1e55049b0a6c676fb0cbf",
        "1.35.7": "12e97f9d23a9f6cbb87b89becd6bd291e1a858a3379a4e11e2c822c4c1530052",
        "1.36.4": "8b8f088da2dab964f853b38464033b1be15ede2839eca751482357c45abdd05a",
        "1.36.3": "ebbd080e7c2e275093b55915722043257eb24004363e20acb3c4d71919f88336",
    },
    "arm64": {
        "1.34.11": "5b045a4712674c88a56fd98eef4285689738b7fbe8735e1b9ee3509521af5cb4",
        "1.34.10": "52d3aeefea32fdfa3671ccd636be5da463ddfd0a2fc09d7bcbaedcff4c76cad5",
        "1.35.8": "cc749967b62f4422260bc9c0aa7a7c55f45175ae38cb8d95767b5d2b7e04c1fd",
        "1.35.7": "5103d45b8881434d417694057b8ccb5ae79fd310a5c5c13e403c5e62e15909be",
        "1.36.4": "0ecf44450ee6063bf19dd166a103ee6df4a9034455c2abce626e6eea657d73fb",
        "1.36.3": "3d86f24401c41ae5a46ac50eef8865fe891d3647d324a0836f6c63757a126e62",
    },
}

CONTAINERD_SHA256: Final[Checksums] = {
    "amd64": {
        "2.1.9": "0083d2a4c2e77eeb20e55b6d955822fb957ff386c0c23959c8b27f598317586c",
        "2.2.7": "91cd216ea26a1b8b512219d3f205375c967e7b7de4dae571bc3dd16bfacd34b5",
        "2.3.4": "9d68969855fbf676cdb8ed758e420fb048d61f984f61de3e53eddfebe484d168",
    },
    "arm64": {
        "2.1.9": "2fbc3053b09812092f6bf316a509d849960eb0cb9332ec88c2f49676d648fd67",
        "2.2.7": "84eb0a161e20ad45465202fa2d6d93b3d9b74666c363e9908706d590a86e2618",
        "2.3.4": "a985fbb7e18fc0362d31a055338f5d7b0e087a3e27f14c70d1c5965399a29f95",
    },
}

RUNC_SHA256: Final[Checksums] = {
    "amd64": {
        "1.3.6": "3f3921dbbee7723e9868f97e88e51ffc910206e3ba55646e74d93d24ea76023c",
        "1.4.3": "f6ae8efc0fa40079e1475e97cbe9d1bd3f106a28d6af78a11d9f1bd565515e60",
    },
    "arm64": {
        "1.3.6": "6be27a061ef89bb14c6cb495405bba80f46cea213b8f79378a6086b1bac6b747",
        "1.4.3": "633301e2e32f8a5ad54031aab4901eb00308bec677dd15faa2751e8f9dab5ca4",
    },
}

CRICTL_SHA256: Final[Checksums] = {
    "amd64": {
        "1.34.0": "a8ff2a3edb37a98daf3aba7c3b284fe0aa5bff24166d896ab9ef64c8913c9f51",
        "1.35.0": "2e141e5b22cb189c40365a11807d69b76b9b3caced89fac2f4ec879408ce2177",
        "1.36.0": "83855e114566a8a8c44c548d515670f51de3a5e1da8b2effb59870e2f10c25a3",
    },
    "arm64": {
        "1.34.0": "c31d252e203df5f4cf37f314bd3092eb79087e791631c1e607087c74b6d0423f",
        "1.35.0": "519071de89b64c43e2a1661bb5489c6c3fd5e9e5fcef75e50e542b0c891f1118",
        "1.36.0": "68328594ccf780a80ae2b092d9f6ce484eec7cf540c275242e8fd954bfd95332",
    },
}
# etcd from a distribution package instead of the release archive: the package
# manager verifies the signature, so no checksum is pinned here. Debian trixie ships
# 3.5.16 (the local test hosts run it), bookworm 3.4.23 (kept for the tests of 3.4's tools).
DISTRO_ETCD_PACKAGES: Final[dict[str, str]] = {"3.5.16": "etcd-server", "3.4.23": "etcd-server"}

CONTAINERD_VERSION: Final = "2.3.4"
RUNC_VERSION: Final = "1.4.3"


def crictl_version(kubernetes_version: str) -> str:
    """crictl follows Kubernetes minor versions: 1.36.x pairs with crictl 1.36.0."""
    major, minor = kubernetes_version.split(".")[:2]
    return f"{major}.{minor}.0"


def kubelet_release_args(k8s: str, arch: str = "amd64") -> str:
    """Arguments of `kcp-host kubelet-install`: each release with its pinned sha256."""
    crictl = crictl_version(k8s)
    return " ".join([
        k8s, KUBELET_SHA256[arch][k8s],
        CONTAINERD_VERSION, CONTAINERD_SHA256[arch][CONTAINERD_VERSION],
        RUNC_VERSION, RUNC_SHA256[arch][RUNC_VERSION],
        crictl, CRICTL_SHA256[arch][crictl],
    ])
