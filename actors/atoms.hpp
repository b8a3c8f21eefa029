#pragma once
// Every atom of the runner's actor protocol, in one place (CAF 0.17: at most 10
// characters each).
#include <caf/atom.hpp>

namespace solstice {

using ack_atom = caf::atom_constant<caf::atom("ack")>;
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
using cleanup_atom = caf::atom_constant<caf::atom("cleanup")>;
using command_atom = caf::atom_constant<caf::atom("command")>;
using connect_atom = caf::atom_constant<caf::atom("connect")>;
using console_atom = caf::atom_constant<caf::atom("console")>;
using done_atom = caf::atom_constant<caf::atom("done")>;
using download_atom = caf::atom_constant<caf::atom("download")>;
using event_atom = caf::atom_constant<caf::atom("event")>;
using exec_atom = caf::atom_constant<caf::atom("exec")>;
using exited_atom = caf::atom_constant<caf::atom("exited")>;
using kill_atom = caf::atom_constant<caf::atom("kill")>;
using launch_atom = caf::atom_constant<caf::atom("launch")>;
using ok_atom = caf::atom_constant<caf::atom("ok")>;
using output_atom = caf::atom_constant<caf::atom("output")>;
using prepare_atom = caf::atom_constant<caf::atom("prepare")>;
using put_file_atom = caf::atom_constant<caf::atom("put_file")>;
using qmp_event_atom = caf::atom_constant<caf::atom("qmp_event")>;
using ready_atom = caf::atom_constant<caf::atom("ready")>;
using start_atom = caf::atom_constant<caf::atom("start")>;
using stop_atom = caf::atom_constant<caf::atom("stop")>;
using stopped_atom = caf::atom_constant<caf::atom("stopped")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using timeout_atom = caf::atom_constant<caf::atom("timeout")>;
using upload_atom = caf::atom_constant<caf::atom("upload")>;

}  // namespace solstice
