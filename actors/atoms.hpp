#pragma once
// Every atom of the runner's actor protocol, in one place (CAF 0.17: at most 10
// characters each).
#include <caf/atom.hpp>

namespace solstice {

using ack_atom = caf::atom_constant<caf::atom("ack")>;
using boot_atom = caf::atom_constant<caf::atom("boot")>;
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
using follow_atom = caf::atom_constant<caf::atom("follow")>;
using handoff_atom = caf::atom_constant<caf::atom("handoff")>;
using identity_atom = caf::atom_constant<caf::atom("identity")>;
using join_atom = caf::atom_constant<caf::atom("join")>;
using kill_atom = caf::atom_constant<caf::atom("kill")>;
using launch_atom = caf::atom_constant<caf::atom("launch")>;
using lost_atom = caf::atom_constant<caf::atom("lost")>;
using notice_atom = caf::atom_constant<caf::atom("notice")>;
using ok_atom = caf::atom_constant<caf::atom("ok")>;
using output_atom = caf::atom_constant<caf::atom("output")>;
using phase_atom = caf::atom_constant<caf::atom("phase")>;
using prepare_atom = caf::atom_constant<caf::atom("prepare")>;
using put_file_atom = caf::atom_constant<caf::atom("put_file")>;
using qmp_closed_atom = caf::atom_constant<caf::atom("qmp_closed")>;
using qmp_event_atom = caf::atom_constant<caf::atom("qmp_event")>;
using ready_atom = caf::atom_constant<caf::atom("ready")>;
using rekey_atom = caf::atom_constant<caf::atom("rekey")>;
using relay_atom = caf::atom_constant<caf::atom("relay")>;
using release_atom = caf::atom_constant<caf::atom("release")>;
using run_job_atom = caf::atom_constant<caf::atom("run_job")>;
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;
using start_atom = caf::atom_constant<caf::atom("start")>;
using status_atom = caf::atom_constant<caf::atom("status")>;
using stop_atom = caf::atom_constant<caf::atom("stop")>;
using stopped_atom = caf::atom_constant<caf::atom("stopped")>;
using submit_atom = caf::atom_constant<caf::atom("submit")>;
using template_atom = caf::atom_constant<caf::atom("template")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using timing_atom = caf::atom_constant<caf::atom("timing")>;
using timeout_atom = caf::atom_constant<caf::atom("timeout")>;
using upload_atom = caf::atom_constant<caf::atom("upload")>;

}  // namespace solstice
