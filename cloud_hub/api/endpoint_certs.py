"""Certificates for scoring endpoints deployed with ``sslEnabled``, from the hub's endpoint CA.

The agent makes a key pair on the device (the private key never leaves it), sends a
certificate request for the service with its device token, and gets a certificate signed by
the endpoint CA, which is not the CA of the hub and the broker: a device's certificate can
never pass for theirs. Its DNS names must start with the device id (``edge-1``,
``edge-1.plant.example``), so one device cannot obtain a certificate in another's name; IP
addresses are taken as given. Callers of a service verify it with the endpoint CA, which
anyone may fetch (``GET /api/v1/hub/endpoint-ca``), as devices fetch the hub's public key.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Ctx
from cloud_hub.api.device_auth import DeviceId
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.fleet.desired import stored_state
from cloud_hub.fleet.tables import DeviceDesired
from cloud_hub.tls.ca import MAX_CSR_BYTES, load_or_make_ca, sign_request
from cloud_hub.tls.material import tls_dir
from manifests.module import NAME_PATTERN

router = APIRouter(tags=["device"])

ENDPOINT_CA_DIR = "endpoint"


class CertificateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN)
    csr_pem: str = Field(max_length=MAX_CSR_BYTES)


class CertificateOut(BaseModel):
    cert_pem: str
    ca_pem: str = Field(description="the endpoint CA: callers verify the service with it")


@router.get("/api/v1/hub/endpoint-ca", tags=["hub"])
def endpoint_ca(ctx: Ctx) -> Response:
    """The CA that signs scoring endpoints' certificates (PEM; no auth needed)."""
    ca = load_or_make_ca(tls_dir(ctx.settings) / ENDPOINT_CA_DIR)
    return Response(ca.cert_pem, media_type="application/x-pem-file")


@router.post("/api/v1/device/certificates", status_code=201, response_model=CertificateOut)
def issue_endpoint_certificate(
    ctx: Ctx, device_id: DeviceId, body: CertificateRequest
) -> CertificateOut:
    """Sign this device's certificate request for one of its services that has ``tls``."""
    with ctx.sessions.begin() as s:
        row = s.get(DeviceDesired, device_id)
        modules = stored_state(row.payload).modules if row is not None and row.payload else []
    module = next((m for m in modules if m.service == body.service), None)
    if module is None:
        raise NotFound(f"service {body.service!r} is not deployed to device {device_id!r}")
    if module.settings.tls is None:
        raise Forbidden(
            f"service {body.service!r} is not deployed with sslEnabled; it gets no certificate"
        )
    ca = load_or_make_ca(tls_dir(ctx.settings) / ENDPOINT_CA_DIR)

    def allowed(name: str) -> bool:
        return name.split(".", 1)[0].lower() == device_id.lower()

    cert = sign_request(ca, body.csr_pem.encode(), allowed_dns=allowed)
    return CertificateOut(cert_pem=cert.decode(), ca_pem=ca.cert_pem.decode())
