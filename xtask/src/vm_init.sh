#!/bin/busybox sh
# /init of the memtrace test VM (built by `cargo xtask vm-test`): mounts what the tracers need,
# sets up swap, cgroups and huge pages, runs one smoke test per memtrace subcommand and prints
#   MEMTRACE-RESULT <test> | <attach method> | PASS|FAIL|SKIP | <detail>
# for each, then MEMTRACE-DONE, and powers off. The host parses these lines.

/bin/busybox --install -s /bin
export PATH=/bin
M=/bin/memtrace
P=/progs
CG=/sys/fs/cgroup

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p $CG && mount -t cgroup2 cgroup2 $CG && echo +memory > $CG/cgroup.subtree_control
# The tracer must survive the OOM tests; the hogs volunteer (vm_mem sets oom_score_adj 1000).
echo -1000 > /proc/self/oom_score_adj

# Swap on zram (the cloud kernel builds it as a module): needed by swapin, vmscan, drsnoop.
# Dependencies first, as the host listed them; built-in ones are not in the list.
for m in $(cat /lib/modules/order); do
	insmod /lib/modules/$m.ko || echo "vm: insmod $m failed"
done
echo 160M > /sys/block/zram0/disksize && mkswap /dev/zram0 > /dev/null && swapon /dev/zram0 \
	|| echo "vm: no zram swap"
echo "vm: kernel $(uname -r), $(grep MemTotal /proc/meminfo), swap $(tail -n +2 /proc/swaps | wc -l) device(s)"

result() { echo "MEMTRACE-RESULT $1 | ${2:--} | $3 | $4"; }
# `cargo xtask vm-test --show-output` boots with memtrace.show: print every tool's output.
grep -q memtrace.show /proc/cmdline && SHOW=1

# The attach method: the tool's own "-v" line, else what `memtrace probe` says for it (up to
# "; ", after which probe says what the tool loses on this kernel).
method() {
	m=$(sed -n "s/.* $2: using //p" /tmp/$1.err | head -n 1)
	[ -n "$m" ] || m=$(sed -n "s/^  $2  *//p" /tmp/probe.out | head -n 1 | sed 's/; .*//')
	echo "$m"
}

# Why a tool failed, in one line: its error, else its last stderr line.
why() {
	w=$(grep -m 1 "error" /tmp/$1.err)
	[ -n "$w" ] || w=$(tail -n 1 /tmp/$1.err)
	echo "${w:-no output} (exit $RC)"
}

# start NAME ARGS...: memtrace ARGS in the background; waits (60 s at most) until it says on
# --ready-fd that its probes are in.
start() {
	NAME=$1
	shift
	$M -v --ready-fd 3 "$@" > /tmp/$NAME.out 2> /tmp/$NAME.err 3> /tmp/$NAME.ready &
	TOOL=$!
	i=0
	while ! grep -q '"ready":true' /tmp/$NAME.ready 2> /dev/null; do
		kill -0 $TOOL 2> /dev/null || return 1
		i=$((i + 1))
		[ $i -lt 600 ] || return 1
		sleep 0.1
	done
}

# finish: waits for the tool (which runs with -d) and kills it after 120 s; sets RC.
finish() {
	(sleep 120; kill -KILL $TOOL 2> /dev/null) &
	dog=$!
	wait $TOOL
	RC=$?
	kill $dog 2> /dev/null
}

# verdict TEST TOOL CHECK-COMMAND...: PASS when the tool exited 0 and the check holds.
verdict() {
	t=$1 tool=$2
	shift 2
	[ -n "$SHOW" ] && sed 's/^/vm:   /' /tmp/$t.out
	if [ "$RC" = 0 ] && "$@"; then
		result $t "$(method $t $tool)" PASS "$DETAIL"
	elif [ "$RC" = 0 ]; then
		result $t "$(method $t $tool)" FAIL "output lacks: $DETAIL"
		tail -n 5 /tmp/$t.out /tmp/$t.err | sed 's/^/vm:   /'
	else
		result $t "$(method $t $tool)" FAIL "$(why $t)"
	fi
}

# has_pid PID TEST [KEY]: the JSON output has KEY (default: any key ending in "pid") equal to PID.
has_pid() { grep -qE "\"${3:-[a-z_]*pid}\": ?$1[,}]" /tmp/$2.out; }

# in_cgroup NAME MAX SWAPMAX CMD...: runs CMD in the background in a fresh memory cgroup.
in_cgroup() {
	d=$CG/$1
	mkdir -p $d && echo $2 > $d/memory.max && echo $3 > $d/memory.swap.max
	shift 3
	sh -c "echo \$\$ > $d/cgroup.procs && exec $*" &
	VICTIM=$!
}

# Each test: start the tracer, provoke its event, check the tracer saw it.
probe_ok() {
	grep -qE "^  kprobes +yes" /tmp/probe.out && grep -qE "^  oomkill +kprobe" /tmp/probe.out \
		&& grep -qE "^  swapin +kprobe" /tmp/probe.out && grep -qE "^  hfaults +kprobe" /tmp/probe.out
}

t_probe() {
	$M probe > /tmp/probe.out 2> /tmp/probe.err
	RC=$?
	DETAIL="kprobes yes; oomkill, swapin, hfaults would use kprobes"
	verdict probe probe probe_ok
}

t_memleak_user() {
	$M -v memleak --json -c "$P/leaky" > /tmp/memleak.out 2> /tmp/memleak.err &
	TOOL=$!
	finish
	DETAIL="leak_malloc in a stack"
	verdict memleak memleak grep -q leak_malloc /tmp/memleak.out
}

# unwind_c, built -O2 without frame pointers: leak_malloc's 5 x 1111 bytes in one stack that
# the unwind tables walk, frame by frame, to the program's entry; every walk complete.
nofp_ok() {
	o=/tmp/memleak-nofp.out
	f=$(tail -n 1 $o | sed -n 's/.*"bytes":5555,"allocs":5,[^[]*"frames":\[\([^]]*\)\].*/\1/p' \
		| grep -o '"func":"[^"]*"' | sed 's/"func":"\(.*\)"/\1/' | tr '\n' ' ')
	c=$(tail -n 1 $o | sed -n 's/.*"cut_stacks":{"walks":\([0-9]*\),"complete":\([0-9]*\),.*/\1 \2/p')
	echo "vm:   memleak-nofp: leak_malloc's stack: ${f:-none}; walks, complete: ${c:-none}"
	[ "$f" = "leak_malloc run_leaks main __libc_start_call_main __libc_start_main_impl _start " ] \
		&& [ "${c% *}" -gt 0 ] && [ "${c% *}" = "${c#* }" ]
}

# Kernels before 5.17 have no bpf_loop, so no unwind tables: memtrace says so, and only there
# the test is skipped; a newer kernel without them fails it.
t_memleak_nofp() {
	why=$(sed -n 's/^  unwind tables  *no  *//p' /tmp/probe.out)
	v=$(uname -r | sed 's/^\([0-9]*\)\.\([0-9]*\).*/\1 \2/')
	if [ -n "$why" ] && [ $((${v% *} * 1000 + ${v#* })) -lt 5017 ]; then
		result memleak-nofp - SKIP "$why"
		return
	fi
	$M -v memleak --json -c "$P/unwind_c" > /tmp/memleak-nofp.out 2> /tmp/memleak-nofp.err &
	TOOL=$!
	finish
	DETAIL="leak_malloc's 5555 bytes in a stack through run_leaks and main to _start, every walk complete"
	verdict memleak-nofp memleak nofp_ok
}

t_memleak_kernel() {
	start memleak-kernel memleak --json -d 6 || { RC=1; verdict memleak-kernel memleak-kernel false; return; }
	mkdir -p /tmp/leak && for i in $(seq 200); do mkdir /tmp/leak/d$i; done
	finish
	DETAIL="outstanding kernel bytes"
	verdict memleak-kernel memleak-kernel grep -qE '"bytes": ?[1-9]' /tmp/memleak-kernel.out
}

# simple TOOL SECONDS PROG ARGS...: the tool must report the pid of PROG.
simple() {
	tool=$1 secs=$2
	shift 2
	start $tool $tool --json -d $secs || { RC=1; verdict $tool $tool false; return; }
	"$@" > /dev/null &
	pid=$!
	wait $pid
	finish
	DETAIL="pid $pid"
	verdict $tool $tool has_pid $pid $tool
}

t_oomkill() {
	start oomkill oomkill --json -d 10 || { RC=1; verdict oomkill oomkill false; return; }
	in_cgroup oomt 16M 0 $P/vm_mem hog 64
	wait $VICTIM
	finish
	DETAIL="victim pid $VICTIM"
	verdict oomkill oomkill has_pid $VICTIM oomkill victim_pid
}

vmscan_ok() {
	grep -qE '"direct_reclaim_calls": ?[1-9]' /tmp/vmscan.out && grep -qE '"kswapd_wakeups": ?[1-9]' /tmp/vmscan.out
}

# Global memory pressure: 420 MiB in a 512 MiB VM wakes kswapd and makes the hog reclaim.
t_global() {
	tool=$1
	start $tool $tool --json -d 12 || { RC=1; verdict $tool $tool false; return; }
	$P/vm_mem hog 420 > /dev/null &
	pid=$!
	wait $pid
	finish
	if [ $tool = vmscan ]; then
		DETAIL="an interval with direct reclaims and kswapd wake-ups"
		verdict vmscan vmscan vmscan_ok
	else
		DETAIL="stall of pid $pid"
		verdict $tool $tool has_pid $pid $tool
	fi
}

swapins_ok() { [ "$1" -ge 1000 ] && grep -q '"func":"hog"' /tmp/swapin.out; }

t_swapin() {
	start swapin swapin --json --stack -d 10 || { RC=1; verdict swapin swapin false; return; }
	# 24 MiB allowed, 64 MiB written then read twice: most pages go to zram and come back.
	in_cgroup swapt 24M max $P/vm_mem hog 64 2
	wait $VICTIM
	finish
	n=$(grep -oE "\"count\":[0-9]+,\"pid\":$VICTIM[,}]" /tmp/swapin.out | sed 's/[^0-9]*\([0-9]*\).*/\1/' \
		| awk '{ n += $1 } END { print n + 0 }')
	# 40 MiB over the limit, read twice: thousands of pages come back from swap.
	DETAIL="$n swap-ins of pid $VICTIM (1000 or more), stack through hog()"
	verdict swapin swapin swapins_ok $n
}

# 4 anonymous huge pages and 2 of a hugetlbfs file, touched once each: exactly 4 faults for
# the first pid, and the file named (read through BTF offsets by the kprobe).
hfaults_ok() {
	grep -qE "\"faults\":4,\"pid\":$1[,}]" /tmp/hfaults.out \
		&& grep -qE '"faults":2,"file":"vmfile"' /tmp/hfaults.out
}

t_hfaults() {
	echo 8 > /proc/sys/vm/nr_hugepages
	mkdir -p /mnt/huge && mount -t hugetlbfs none /mnt/huge
	start hfaults hfaults --json -d 6 || { RC=1; verdict hfaults hfaults false; return; }
	$P/hfaults_touch 4 > /dev/null &
	pid=$!
	wait $pid
	$P/hfaults_touch 2 /mnt/huge/vmfile > /dev/null
	finish
	umount /mnt/huge
	echo 0 > /proc/sys/vm/nr_hugepages
	DETAIL="4 faults of pid $pid, 2 in file vmfile"
	verdict hfaults hfaults hfaults_ok $pid
}

t_probe
t_memleak_user
t_memleak_nofp
t_memleak_kernel
t_oomkill
simple mmapsnoop 4 $P/vm_mem mmap
simple brkstack 4 $P/vm_mem brk
simple shmsnoop 4 $P/vm_mem shm
simple faults 4 $P/vm_mem touch 300
t_global vmscan
t_global drsnoop
t_swapin
t_hfaults
echo MEMTRACE-DONE
poweroff -f
