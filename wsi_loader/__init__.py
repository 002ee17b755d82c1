"""Generated wire protocol shared by loader_service and trainer_client (see protos/)."""
