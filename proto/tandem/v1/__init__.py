"""Generated protobuf/gRPC stubs for ``tandem.v1`` (see ``tandem.proto_gen``); import as
``from tandem.proto import worker_pb2, worker_pb2_grpc``."""
