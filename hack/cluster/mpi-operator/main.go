// Command mpi-operator runs the MPIJob controller of the pinned kubeflow/mpi-operator release
// against one cluster.
//
// It uses the release's controller, options and client packages unchanged. It differs from the
// release's own cmd/mpi-operator in two ways only, both needed to run several local clusters side by
// side on one machine: it runs a single replica without leader election, and it serves /healthz and
// /metrics on an address the caller chooses (the release binds :8080 on every interface, hard-coded).
package main

import (
	"context"
	"flag"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/kubeflow/mpi-operator/cmd/mpi-operator/app/options"
	mpijobclientset "github.com/kubeflow/mpi-operator/pkg/client/clientset/versioned"
	kubeflowscheme "github.com/kubeflow/mpi-operator/pkg/client/clientset/versioned/scheme"
	mpijobinformers "github.com/kubeflow/mpi-operator/pkg/client/informers/externalversions"
	"github.com/kubeflow/mpi-operator/pkg/controller"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	kubeinformers "k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

func main() {
	opt := options.NewServerOption()
	opt.AddFlags(flag.CommandLine)
	healthAddress := flag.String("health-address", "",
		"host:port serving /healthz and /metrics (e.g. 127.0.0.1:0); empty serves nothing")
	flag.Parse()

	if opt.GangSchedulingName != "" {
		klog.Fatalf("--gang-scheduling is not supported by this entry point")
	}
	if env := os.Getenv("KUBECONFIG"); env != "" && opt.Kubeconfig == "" {
		opt.Kubeconfig = env
	}
	cfg, err := clientcmd.BuildConfigFromFlags(opt.MasterURL, opt.Kubeconfig)
	if err != nil {
		klog.Fatalf("building the client configuration: %v", err)
	}
	cfg.QPS = float32(opt.QPS)
	cfg.Burst = opt.Burst

	kubeClient, err := kubernetes.NewForConfig(rest.AddUserAgent(cfg, "mpi-operator"))
	if err != nil {
		klog.Fatalf("creating the Kubernetes client: %v", err)
	}
	mpiJobClient, err := mpijobclientset.NewForConfig(cfg)
	if err != nil {
		klog.Fatalf("creating the MPIJob client: %v", err)
	}
	if err := kubeflowscheme.AddToScheme(scheme.Scheme); err != nil {
		klog.Fatalf("registering the MPIJob types: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if *healthAddress != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte("ok"))
		})
		mux.Handle("/metrics", promhttp.Handler())
		go func() {
			if err := http.ListenAndServe(*healthAddress, mux); err != nil {
				klog.Fatalf("serving health and metrics on %s: %v", *healthAddress, err)
			}
		}()
	}

	var kubeOpts []kubeinformers.SharedInformerOption
	var mpiJobOpts []mpijobinformers.SharedInformerOption
	if opt.Namespace != "" {
		kubeOpts = append(kubeOpts, kubeinformers.WithNamespace(opt.Namespace))
		mpiJobOpts = append(mpiJobOpts, mpijobinformers.WithNamespace(opt.Namespace))
	}
	kubeInformers := kubeinformers.NewSharedInformerFactoryWithOptions(kubeClient, 0, kubeOpts...)
	mpiJobInformers := mpijobinformers.NewSharedInformerFactoryWithOptions(mpiJobClient, 0, mpiJobOpts...)

	ctrl, err := controller.NewMPIJobController(ctx, kubeClient, mpiJobClient, nil, nil,
		kubeInformers.Core().V1().ConfigMaps(),
		kubeInformers.Core().V1().Secrets(),
		kubeInformers.Core().V1().Services(),
		kubeInformers.Batch().V1().Jobs(),
		kubeInformers.Core().V1().Pods(),
		kubeInformers.Scheduling().V1().PriorityClasses(),
		mpiJobInformers.Kubeflow().V2beta1().MPIJobs(),
		opt)
	if err != nil {
		klog.Fatalf("creating the MPIJob controller: %v", err)
	}
	kubeInformers.Start(ctx.Done())
	mpiJobInformers.Start(ctx.Done())
	klog.Infof("running the MPIJob controller with %d workers", opt.Threadiness)
	if err := ctrl.Run(opt.Threadiness, ctx.Done()); err != nil {
		klog.Fatalf("running the MPIJob controller: %v", err)
	}
}
