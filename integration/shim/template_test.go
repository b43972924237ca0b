package shim_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmpod/vmpod/integration/testenv"
)

// TestPodsFromATemplate: with hypervisor.templates (docs/design/022) the first q35 pod of
// its shape makes the template and both it and the next pod are restored from it (their
// QEMU started -incoming, the template made once), and both are whole pods: the pod's NIC
// plugged after the restore carries the pod IP to a web server whose files come over the
// virtio-fs device plugged after it, exec works, and removal leaves no VM.
func TestPodsFromATemplate(t *testing.T) {
	testenv.RequireTestbed(t)
	dir := testenv.TemplateDir(t)
	_ = os.RemoveAll(dir)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	var template os.FileInfo
	for _, name := range []string{"tmpl-first", "tmpl-second"} {
		var pod *testenv.Pod
		var ip string
		testenv.WithNodeConfig(t, testenv.TemplateConfig, func() {
			pod, ip = webServer(t, testenv.PodConfig{Metadata: testenv.Metadata{Name: name}})
		})
		states, _ := filepath.Glob(filepath.Join(dir, "*.state"))
		if len(states) != 1 {
			t.Fatalf("%s: templates %v, want one", name, states)
		}
		st, err := os.Stat(states[0])
		if err != nil {
			t.Fatal(err)
		}
		if template == nil {
			template = st
		} else if !os.SameFile(template, st) {
			t.Errorf("%s: the template was made again", name)
		}
		qemu := ""
		for _, p := range testenv.LiveProcessesMentioning("guest=" + pod.ID) {
			if strings.Contains(p, "qemu-system") {
				qemu = p
			}
		}
		if !strings.Contains(qemu, "-incoming defer") || !strings.Contains(qemu, "-machine q35") {
			t.Errorf("%s: QEMU %q: want a q35 machine restored (-incoming)", name, qemu)
		}
		if body := fetch(t, "http://"+ip+":8080/"); !strings.Contains(body, "-vmpod") {
			t.Errorf("%s: pod IP %s answered %q, want the guest's page", name, ip, body)
		}
		id := pod.Container(testenv.ContainerConfig{Metadata: testenv.Metadata{Name: "probe"}, Command: sh("sleep 1000")})
		// the container's rootfs is on the share the agent mounted after the restore
		if out, err := testenv.Cmd("crictl", "exec", "-s", id, "sh", "-c", "grep -c ' / virtiofs ' /proc/mounts"); err != nil || strings.TrimSpace(out) != "1" {
			t.Errorf("%s: exec: %v, %q: want the rootfs on virtio-fs", name, err, out)
		}
		if stopErr, rmErr := pod.Remove(time.Minute); stopErr != nil || rmErr != nil {
			t.Errorf("%s: remove: %v, %v", name, stopErr, rmErr)
		}
	}
	assertNoPodVMs(t)
}
