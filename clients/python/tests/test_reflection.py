"""Server reflection as generic gRPC tools use it, through grpc-python's reflection client
(grpcio-reflection), which asks reflection v1alpha, as older grpcurl, grpcui and Postman do:
list the services, describe one, and call it with message types learnt from the daemon alone,
as `grpcurl -plaintext ADDR list` and `grpcurl -plaintext -d '{}' ADDR
ppu.v1.DeviceService/ListDevices` do."""

from __future__ import annotations

import grpc
from conftest import Daemon
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def test_reflection_v1alpha_lists_describes_and_drives_the_api(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.addr) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        for wanted in (
            "ppu.v1.ExperimentService",
            "ppu.v1.QueueService",
            "ppu.v1.EventService",
            "ppu.v1.DeviceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ):
            assert wanted in services, f"{wanted} not listed: {sorted(services)}"

        # A pool fed only by reflection: nothing of ppu's compiled into this test.
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("ppu.v1.DeviceService")
        method = service.methods_by_name["ListDevices"]
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        list_devices = channel.unary_unary(
            "/ppu.v1.DeviceService/ListDevices",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        reply = list_devices(json_format.Parse("{}", request_type()), timeout=30.0)
        as_json = json_format.MessageToDict(reply)
        assert any(d["id"] == "furnace-1" for d in as_json["devices"]), as_json

        # The device families' schemas are served too, so a generic client can decode
        # `Step.command` and `StepResult.output` of any family.
        result = pool.FindMessageTypeByName("ppu.devices.mfc.v1.GasFlowResult")
        assert "mean_flow_sccm" in result.fields_by_name
