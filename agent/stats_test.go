package agent

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCgroupStatsParsesV2Files(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"cpu.stat":       "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 20\n",
		"memory.current": "4096\n",
		"memory.max":     "max\n",
		"memory.stat":    "anon 1024\nfile 2048\n",
		"memory.events":  "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n",
		"pids.current":   "3\n",
		"pids.max":       "100\n",
		"io.stat":        "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s, err := cgroupStats(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.Cpu.UsageUsec != 1500 || s.Cpu.ThrottledUsec != 20 {
		t.Errorf("cpu: %+v", s.Cpu)
	}
	if s.Memory.Usage != 4096 || s.Memory.Limit != 0 || s.Memory.Stat["file"] != 2048 || s.Memory.OomKill != 1 {
		t.Errorf("memory: %+v", s.Memory)
	}
	if s.Pids.Current != 3 || s.Pids.Limit != 100 {
		t.Errorf("pids: %+v", s.Pids)
	}
	if len(s.Io) != 1 || s.Io[0].Major != 254 || s.Io[0].Wbytes != 20 {
		t.Errorf("io: %+v", s.Io)
	}
}

func TestCgroupStatsMissingCgroup(t *testing.T) {
	if _, err := cgroupStats(filepath.Join(t.TempDir(), "gone")); err == nil {
		t.Fatal("stats of a missing cgroup succeeded")
	}
}
