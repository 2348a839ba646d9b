// The attention-offload wire protocol between compute ranks (clients) and
// memory nodes (servers, runtime/offload/offload_server.h), over point-to-point
// operations of a Communicator that spans both.
//
// A request is: a fixed header (int64 [version, control bytes, payload count]),
// the control message (a serialized pb::OffloadMessage naming the type, the
// call, positions and each payload's dtype and shape), an acknowledgement from
// the server (OK, or ERROR naming what is wrong: nothing else is sent then),
// the payload tensors, and the server's reply (header, control, payloads).
// Acknowledging before payloads travel is what lets a server refuse an
// oversized or malformed request without receiving it and stay up.
// Tags are kOffloadTag + 0 (header), + 1 (control), + 2 + i (payload i); one
// request at a time per client and server pair, so messages cannot cross.
// Payloads are floating point, except the last one of a message with
// `documents` set: the query chunk's doc_start (int64).
// Versions: 1 the original; 2 adds `documents` to ATTEND / ATTEND_BACKWARD. A
// node answers a different version with ERROR naming both (a version-1 node
// would not know that the extra payload masks the attention).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/proto/loom.pb.h"

namespace loom::offload {

constexpr uint32_t kProtocolVersion = 2;
constexpr int kTag = 7100;
constexpr int64_t kMaxControlBytes = 1 << 16;
constexpr int kMaxPayloads = 8;
constexpr int64_t kMaxPayloadBytes = int64_t(1) << 32;  // one message's payloads; larger is malformed

// A memory node answered ERROR (or a reply was malformed): the message names
// the node, the request and the reason.
class OffloadError : public LoomError {
 public:
  using LoomError::LoomError;
};

const char* type_name(pb::OffloadMessage::Type type);

// Describes `t` for a control message.
pb::OffloadTensorSpec spec_of(const at::Tensor& t);
// Bytes the payloads described by `msg` take; throws OffloadError naming the
// first bad spec (unknown dtype, or not the one its place allows: floating,
// or int64 for the doc_start of a `documents` message; negative or oversized
// shape; too many).
int64_t payload_bytes(const pb::OffloadMessage& msg, int64_t limit_bytes);

// Sends header + control to `peer` (does not wait for the acknowledgement);
// returns the bytes sent.
int64_t send_control(Communicator& comm, int peer, const pb::OffloadMessage& msg);
// Receives header + control from `peer`; a wrong version or size, or a control
// message that does not parse, throws OffloadError (the header was consumed;
// the caller answers ERROR).
pb::OffloadMessage receive_control(Communicator& comm, int peer, const at::Tensor& header);
// Posts the receive of a header from `peer` (the server polls these).
WorkPtr post_header(Communicator& comm, int peer, at::Tensor& header);

void send_payloads(Communicator& comm, int peer, const std::vector<at::Tensor>& payloads);
std::vector<at::Tensor> receive_payloads(Communicator& comm, int peer, const pb::OffloadMessage& msg);

// A whole message without acknowledgement (replies): control then payloads.
void send_message(Communicator& comm, int peer, pb::OffloadMessage msg, const std::vector<at::Tensor>& payloads);
// `control_bytes` (optional) gets the bytes of header + control received.
pb::OffloadMessage receive_message(Communicator& comm, int peer, std::vector<at::Tensor>* payloads,
                                   int64_t* control_bytes = nullptr);

}  // namespace loom::offload
